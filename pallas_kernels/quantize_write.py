"""Packed page write: quantize whole pages of new K or V, pack them and scatter them into a layer's pool, in place.

The cache moves tokens out of its full-precision tail a whole page at a time (DESIGN.md "Residual window"), so the
unit of work is a page: `pages[:, m]` holds the P tokens of one page that is leaving the tail, and `dest[m]` the
physical page it goes to (negative: skip; lets a batch carry sequences that flush nothing this step).

This file holds the shared validation, the pure-jnp reference (the oracle) and the public dispatcher. What a page
holds and how it is quantized belongs to the store's mode (`kvtuner_jax.modes`); `quantize_pages` /
`dequantize_pages` are the mode's numerics, and the dispatcher runs the mode's kernel for the backend (today's
`quantize_write_{gpu,tpu}` for "int" and "bf16"), or the reference with a one-time warning when the mode has none.
Backend kernels live beside it and are tested against `quantize_write_reference`.
"""

from __future__ import annotations

import jax.numpy as jnp

from kvtuner_jax import modes
from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout


def validate(codes, scale, zero, pages, dest, spec: KVSpec) -> None:
    """Shape and dtype checks shared by the reference and every kernel."""
    if pages.ndim != 4:
        raise ValueError(f"pages must be [heads, M, page_size, head_dim], got shape {pages.shape}")
    h, m, p, d = pages.shape
    layout.check_spec(spec, p, d)
    n = codes.shape[1]
    check_pool(codes, scale, zero, spec, layout.arrays(spec, h, n, p, d), "")
    if dest.shape != (m,):
        raise ValueError(f"dest must be [{m}] (one physical page per page written), got {dest.shape}")


def check_pool(codes, scale, zero, spec: KVSpec, want: modes.PoolArrays, name: str) -> None:
    """Raises ValueError when the pool arrays' shapes (or which of scale/zero exist) differ from the mode's layout.
    `name` prefixes messages ("k_", "v_" or "")."""
    if tuple(codes.shape) != want.codes.shape:
        raise ValueError(f"{name}codes shape {codes.shape} does not match the {spec} layout {want.codes.shape}")
    for arr, w, what in ((scale, want.scale, "scale"), (zero, want.zero, "zero")):
        if w is None and arr is not None:
            raise ValueError(f"{name}{what} must be None for {spec} (its layout has no {what})")
        if w is not None and arr is None:
            if what == "zero" and want.scale is not None:
                raise ValueError(f"{name}zero must be None exactly when the spec is symmetric")
            raise ValueError(f"{name}{what} shape None does not match {w.shape}")
        if w is not None and tuple(arr.shape) != w.shape:
            raise ValueError(f"{name}{what} shape {arr.shape} does not match {w.shape}")


def quantize_pages(pages: jnp.ndarray, spec: KVSpec):
    """[H, M, P, D] float -> (codes, scale, zero) in the pool layout (M pages). Pure jnp; the numerics oracle.

    The store's mode decides the numerics (bits 16: the pages themselves, no scale/zero)."""
    return modes.mode_of(spec).quantize_pages(pages, spec)


def dequantize_pages(codes, scale, zero, spec: KVSpec, dtype=jnp.float32) -> jnp.ndarray:
    """Pool-layout arrays of some pages `[..., page rows, cols]` -> values `[..., P, D]` in `dtype`."""
    return modes.mode_of(spec).dequantize_pages(codes, scale, zero, spec, dtype)


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

    backend: "auto" | "reference" | "gpu" | "tpu" (see `paged_attention.resolve_backend`). For "gpu"/"tpu" the
    store's mode supplies the kernel (`Mode.write_kernel`; for "int"/"bf16" `pallas_kernels.quantize_write_gpu` /
    `quantize_write_tpu`, imported lazily), with this signature minus `backend`, writing in place (input/output
    aliased; donate the pool under jit). A mode without a kernel for the backend runs the reference instead, and a
    warning is logged once.
    """
    from pallas_kernels.paged_attention import kernel_unsupported, resolve_backend

    requested, backend = backend, resolve_backend(backend)
    if backend == "reference":
        return quantize_write_reference(codes, scale, zero, pages, dest, spec=spec)
    validate(codes, scale, zero, pages, dest, spec)
    mode = modes.mode_of(spec)
    kernel = mode.write_kernel(backend)
    if kernel is None:
        modes.warn_once(
            (mode.name, "write", backend),
            f"KV mode {mode.name!r} has no {backend} write kernel; its pages are written by the jnp reference path",
        )
        return quantize_write_reference(codes, scale, zero, pages, dest, spec=spec)
    # A kernel module may say which shapes it cannot write (`unsupported(pages, *, spec)`): "auto" then uses the
    # reference for this layer (logged once); an explicit backend raises (in the kernel's own check).
    reason = kernel_unsupported(kernel, pages, spec=spec) if requested == "auto" else None
    if reason:
        modes.warn_once((spec, pages.shape[2:], "write", backend), f"{reason}: this layer is written by the reference")
        return quantize_write_reference(codes, scale, zero, pages, dest, spec=spec)
    return kernel(codes, scale, zero, pages, dest, spec=spec, interpret=interpret)
