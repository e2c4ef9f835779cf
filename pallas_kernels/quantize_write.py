"""Packed page write: quantize whole pages of new K or V, pack them and scatter them into a layer's pool, in place.

The cache moves tokens out of its full-precision tail a whole page at a time (DESIGN.md "Residual window"), so the
unit of work is a page: `pages[:, m]` holds the P tokens of one page that is leaving the tail, and `dest[m]` the
physical page it goes to (negative: skip; lets a batch carry sequences that flush nothing this step).

This file holds the shared validation, the pure-jnp reference (the oracle) and the public dispatcher. Backend kernels
live beside it and are tested against `quantize_write_reference`.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp

from kvtuner_jax import quant
from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout


def validate(codes, scale, zero, pages, dest, spec: KVSpec) -> None:
    """Shape and dtype checks shared by the reference and every kernel."""
    if pages.ndim != 4:
        raise ValueError(f"pages must be [heads, M, page_size, head_dim], got shape {pages.shape}")
    h, m, p, d = pages.shape
    layout.check_spec(spec, p, d)
    n = codes.shape[1]
    want = layout.codes_shape(spec, h, n, p, d)
    if tuple(codes.shape) != want:
        raise ValueError(f"codes shape {codes.shape} does not match the {spec} layout {want}")
    ss = layout.scale_shape(spec, h, n, p, d)
    if ss is not None:
        if scale is None or tuple(scale.shape) != ss:
            raise ValueError(f"scale shape {None if scale is None else scale.shape} does not match {ss}")
        if spec.symmetric != (zero is None):
            raise ValueError("zero must be None exactly when the spec is symmetric")
        if zero is not None and tuple(zero.shape) != ss:
            raise ValueError(f"zero shape {zero.shape} does not match {ss}")
    if dest.shape != (m,):
        raise ValueError(f"dest must be [{m}] (one physical page per page written), got {dest.shape}")


def quantize_pages(pages: jnp.ndarray, spec: KVSpec):
    """[H, M, P, D] float -> (codes, scale, zero) in the pool layout (M pages). Pure jnp; the numerics oracle."""
    if not spec.quantized:
        return pages, None, None
    sdt = quant.scale_dtype_of(spec.scale_dtype)
    codes, scale, zero = quant.quantize(pages, spec.bits, spec.group_size, spec.axis, spec.symmetric, sdt)
    return quant.pack(codes, spec.bits, quant.packed_axis(spec.axis)), scale, zero


def dequantize_pages(codes, scale, zero, spec: KVSpec, dtype=jnp.float32) -> jnp.ndarray:
    """Pool-layout arrays of some pages `[..., page rows, cols]` -> values `[..., P, D]` in `dtype`."""
    if not spec.quantized:
        return codes.astype(dtype)
    c = quant.unpack(codes, spec.bits, quant.packed_axis(spec.axis))
    return quant.dequantize(c, scale, zero, spec.bits, spec.group_size, spec.axis, dtype=dtype)


def _scatter(pool: jnp.ndarray, new: jnp.ndarray, dest: jnp.ndarray) -> jnp.ndarray:
    n = pool.shape[1]
    idx = jnp.where(dest < 0, n, dest)  # out of range -> dropped (a negative index would wrap)
    return pool.at[:, idx].set(new.astype(pool.dtype), mode="drop")


def quantize_write_reference(codes, scale, zero, pages, dest, *, spec: KVSpec):
    """Reference: quantize `pages` [H, M, P, D] and write page m to physical page dest[m] (skip when < 0)."""
    validate(codes, scale, zero, pages, dest, spec)
    c, s, z = quantize_pages(pages, spec)
    codes = _scatter(codes, c, dest)
    if s is not None:
        scale = _scatter(scale, s, dest)
    if z is not None:
        zero = _scatter(zero, z, dest)
    return codes, scale, zero


def quantize_write(codes, scale, zero, pages, dest, *, spec: KVSpec, backend: str = "auto", interpret: bool = False):
    """Public entry: dispatches to the reference or a Pallas kernel by `backend`.

    backend: "auto" | "reference" | "gpu" | "tpu" (see `paged_attention.resolve_backend`). Backend modules
    `pallas_kernels.quantize_write_gpu` / `quantize_write_tpu` expose `quantize_write` with this signature minus
    `backend`, are imported lazily, and write in place (input/output aliased; donate the pool under jit).
    """
    from pallas_kernels.paged_attention import resolve_backend

    backend = resolve_backend(backend)
    if backend == "reference":
        return quantize_write_reference(codes, scale, zero, pages, dest, spec=spec)
    validate(codes, scale, zero, pages, dest, spec)
    mod = importlib.import_module(f"pallas_kernels.quantize_write_{backend}")
    return mod.quantize_write(codes, scale, zero, pages, dest, spec=spec, interpret=interpret)
