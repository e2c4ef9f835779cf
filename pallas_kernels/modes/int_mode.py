"""Mode `int`: integer codes of DESIGN.md's numerics contract (2/4/8 bits, per-token or per-channel groups, sym/asym).

For H KV heads, N pages, page size P, head_dim D, bits b, group size G:
- axis "token": codes uint8 `[H, N, P, D*b/8]` (packed along D, LSB first); scale `[H, N, P, D/G]`; zero the same or
  None when symmetric.
- axis "channel": codes uint8 `[H, N, P*b/8, D]` (packed along the page's tokens); scale `[H, N, P/G, D]`; zero alike.
Numerics: `kvtuner_jax.quant` (the oracle). Kernels: `pallas_kernels.{quantize_write,paged_attention}_{gpu,tpu}`.
"""

from __future__ import annotations

import importlib
from fractions import Fraction

from kvtuner_jax.modes import ArraySpec, Mode, PoolArrays
from kvtuner_jax.specs import SCALE_DTYPE_BYTES, KVSpec

# Modes today's GPU/TPU attention kernels understand (bits 16 is mode bf16 and they read it unquantized).
KERNEL_MODES = ("int", "bf16")


class IntMode(Mode):
    name = "int"
    valid_bits = (2, 4, 8)

    def validate(self, spec: KVSpec, page_size: int | None, head_dim: int) -> None:
        if spec.bits not in self.valid_bits:
            raise ValueError(f"bits={spec.bits} is not one of 2, 4, 8, 16")
        if spec.axis == "token":
            if head_dim % spec.group_size:
                raise ValueError(f"group_size={spec.group_size} does not divide head_dim={head_dim} (axis 'token')")
            if (head_dim * spec.bits) % 8:
                raise ValueError(f"head_dim={head_dim} does not pack into whole bytes at {spec.bits} bits")
        elif spec.axis == "channel":
            if page_size is None:
                return
            if page_size % spec.group_size:
                raise ValueError(f"group_size={spec.group_size} does not divide page_size={page_size} (axis 'channel')")
            if (page_size * spec.bits) % 8:
                raise ValueError(f"page_size={page_size} does not pack into whole bytes at {spec.bits} bits")
        else:
            raise ValueError(f"axis={spec.axis!r} is not 'token' or 'channel'")

    def arrays(self, spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype: str):
        if spec.axis == "token":
            codes = (heads, pages, page_size, head_dim * spec.bits // 8)
            scale = (heads, pages, page_size, head_dim // spec.group_size)
        else:
            codes = (heads, pages, page_size * spec.bits // 8, head_dim)
            scale = (heads, pages, page_size // spec.group_size, head_dim)
        s = ArraySpec(scale, spec.scale_dtype)
        return PoolArrays(ArraySpec(codes, "uint8"), s, None if spec.symmetric else s)

    def bytes_per_token(self, spec: KVSpec, heads: int, head_dim: int, cache_dtype_bytes: int = 2) -> Fraction:
        # "token": D/G groups per token; "channel": D groups per G tokens -- the same count, exact as a Fraction.
        n = heads * head_dim
        params = Fraction(n, spec.group_size) * spec.params_per_group * SCALE_DTYPE_BYTES[spec.scale_dtype]
        return Fraction(n * spec.bits, 8) + params

    def page_size_of(self, spec: KVSpec, codes_shape: tuple[int, ...], head_dim: int) -> int:
        return codes_shape[2] * 8 // spec.bits if spec.axis == "channel" else codes_shape[2]

    def describe(self, spec: KVSpec) -> str:
        return f"{spec.bits} {spec.axis} G{spec.group_size} {'sym' if spec.symmetric else 'asym'}"

    def quantize_pages(self, pages, spec: KVSpec):
        from kvtuner_jax import quant

        sdt = quant.scale_dtype_of(spec.scale_dtype)
        codes, scale, zero = quant.quantize(pages, spec.bits, spec.group_size, spec.axis, spec.symmetric, sdt)
        return quant.pack(codes, spec.bits, quant.packed_axis(spec.axis)), scale, zero

    def dequantize_pages(self, codes, scale, zero, spec: KVSpec, dtype):
        from kvtuner_jax import quant

        c = quant.unpack(codes, spec.bits, quant.packed_axis(spec.axis))
        return quant.dequantize(c, scale, zero, spec.bits, spec.group_size, spec.axis, dtype=dtype)

    def write_kernel(self, backend: str):
        return importlib.import_module(f"pallas_kernels.quantize_write_{backend}").quantize_write

    def attention_kernel(self, backend: str, k_spec: KVSpec, v_spec: KVSpec):
        return builtin_attention_kernel(backend, k_spec, v_spec)


def builtin_attention_kernel(backend: str, k_spec: KVSpec, v_spec: KVSpec):
    """Today's GPU/TPU paged attention, when both K and V are int/bf16; else None."""
    from kvtuner_jax.modes import mode_name_of

    if mode_name_of(k_spec) in KERNEL_MODES and mode_name_of(v_spec) in KERNEL_MODES:
        return importlib.import_module(f"pallas_kernels.paged_attention_{backend}").paged_attention
    return None


MODE = IntMode()
