"""Mode `fp8`: float8_e4m3fn codes with one scale per token and KV head (bits 8).

Layout (H KV heads, N pages, page size P, head_dim D): codes float8_e4m3fn `[H, N, P, D]`; scale `[H, N, P, 1]` in
the scale dtype; zero None. Bytes per token: `H * D` + `H * 2` (one 16-bit scale per head). The int mode's axis,
group_size and symmetric fields do not apply and are canonicalised (axis "token", G = D, symmetric).

Numerics (the oracle, `quantize_pages` / `dequantize_pages`), per token and head over its D channels:
    scale = min(max(amax, EPS) / 448, max finite of the scale dtype), rounded to the scale dtype first (as "int" does,
            so what is stored is exactly what the codes were made against)
    codes = float8_e4m3fn(clip(x / scale, -448, 448))   (round-to-nearest-even by the cast; the clip only guards
            against the scale's rounding pushing |x| / scale a hair past 448, which would cast to NaN)
    x_hat = float32(codes) * scale
448 is e4m3fn's largest finite value. Non-finite inputs quantize as 0 (quant.py's contract).

Kernels: `pallas_kernels.modes.fp8_kernels` (GPU/Triton and TPU/Mosaic page writes, and paged attention when K and
V are each fp8 or bf16); an fp8 store paired with an int one is read by the reference path (warned once).
"""

from __future__ import annotations

import dataclasses
import importlib
from fractions import Fraction

from kvtuner_jax.modes import ArraySpec, Mode, PoolArrays
from kvtuner_jax.specs import SCALE_DTYPE_BYTES, KVSpec

E4M3_MAX = 448.0
EPS = 1e-4  # same floor as kvtuner_jax.quant.EPS: an all-zero token gets a finite, nonzero scale


class FP8Mode(Mode):
    name = "fp8"
    valid_bits = (8,)
    implied_bits = 8

    def canonical(self, spec: KVSpec, head_dim: int) -> KVSpec:
        return dataclasses.replace(spec, axis="token", group_size=head_dim, symmetric=True)

    def validate(self, spec: KVSpec, page_size: int | None, head_dim: int) -> None:
        if spec.bits != 8:
            raise ValueError(f"bits={spec.bits}: mode 'fp8' stores 8 bits (float8_e4m3fn)")
        if spec.scale_dtype not in SCALE_DTYPE_BYTES:
            raise ValueError(f"scale_dtype={spec.scale_dtype!r} is not one of {sorted(SCALE_DTYPE_BYTES)}")

    def arrays(self, spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype: str):
        codes = ArraySpec((heads, pages, page_size, head_dim), "float8_e4m3fn")
        return PoolArrays(codes, ArraySpec((heads, pages, page_size, 1), spec.scale_dtype), None)

    def bytes_per_token(self, spec: KVSpec, heads: int, head_dim: int, cache_dtype_bytes: int = 2) -> Fraction:
        return Fraction(heads * head_dim + heads * SCALE_DTYPE_BYTES[spec.scale_dtype])

    def describe(self, spec: KVSpec) -> str:
        return "8 fp8 e4m3 per-token-head"

    def quantize_pages(self, pages, spec: KVSpec):
        import jax.numpy as jnp

        from kvtuner_jax.quant import scale_dtype_of

        sdt = scale_dtype_of(spec.scale_dtype)
        x = pages.astype(jnp.float32)
        x = jnp.where(jnp.isfinite(x), x, 0.0)
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)  # [H, M, P, 1]
        fmax = float(jnp.finfo(sdt).max)
        scale = jnp.minimum(jnp.maximum(amax, EPS) / E4M3_MAX, fmax).astype(sdt)
        codes = jnp.clip(x / scale.astype(jnp.float32), -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
        return codes, scale, None

    def dequantize_pages(self, codes, scale, zero, spec: KVSpec, dtype):
        import jax.numpy as jnp

        return (codes.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)

    def write_kernel(self, backend: str):
        kernels = importlib.import_module("pallas_kernels.modes.fp8_kernels")
        return getattr(kernels, f"quantize_write_{backend}", None)

    def attention_kernel(self, backend: str, k_spec: KVSpec, v_spec: KVSpec):
        kernels = importlib.import_module("pallas_kernels.modes.fp8_kernels")
        return kernels.attention_kernel(backend, k_spec, v_spec)


MODE = FP8Mode()
