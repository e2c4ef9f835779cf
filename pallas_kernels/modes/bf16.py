"""Mode `bf16`: unquantized. `codes` holds the values themselves, `[H, N, P, D]` in the cache dtype (bf16 for
serving, float32 for exact evaluation); no scale, no zero. Any spec with bits == 16 is stored this way."""

from __future__ import annotations

import importlib
from fractions import Fraction

from kvtuner_jax.modes import ArraySpec, Mode, PoolArrays
from kvtuner_jax.specs import KVSpec
from pallas_kernels.modes.int_mode import builtin_attention_kernel


class BF16Mode(Mode):
    name = "bf16"
    valid_bits = (16,)
    implied_bits = 16

    def validate(self, spec: KVSpec, page_size: int | None, head_dim: int) -> None:
        if spec.bits != 16:
            raise ValueError(f"bits={spec.bits}: mode 'bf16' stores 16 bits (unquantized)")

    def arrays(self, spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype: str):
        return PoolArrays(ArraySpec((heads, pages, page_size, head_dim), cache_dtype))

    def bytes_per_token(self, spec: KVSpec, heads: int, head_dim: int, cache_dtype_bytes: int = 2) -> Fraction:
        return Fraction(heads * head_dim * cache_dtype_bytes)

    def describe(self, spec: KVSpec) -> str:
        return "16 (bf16)"

    def quantize_pages(self, pages, spec: KVSpec):
        return pages, None, None

    def dequantize_pages(self, codes, scale, zero, spec: KVSpec, dtype):
        return codes.astype(dtype)

    def write_kernel(self, backend: str):
        return importlib.import_module(f"pallas_kernels.quantize_write_{backend}").quantize_write

    def attention_kernel(self, backend: str, k_spec: KVSpec, v_spec: KVSpec):
        return builtin_attention_kernel(backend, k_spec, v_spec)


MODE = BF16Mode()
