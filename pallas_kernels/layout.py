"""Pool layout of one K or V store of one layer: the one place core code asks which arrays exist and their shapes.

Every pool is the triple `(codes, scale, zero)`; scale and zero may be None. What they hold is decided by the store's
*mode* (`kvtuner_jax.modes`, looked up from the `KVSpec`); for H KV heads, N physical pages, page size P, head_dim D:

- bits 16 (mode "bf16", unquantized): `codes` holds the values themselves, `[H, N, P, D]` in the cache dtype.
- mode "int", axis "token": `codes` uint8 `[H, N, P, D*b/8]` (packed along D, LSB first); `scale` `[H, N, P, D/G]`
  (scale dtype); `zero` the same shape, or None when symmetric.
- mode "int", axis "channel": `codes` uint8 `[H, N, P*b/8, D]` (packed along the page's tokens, LSB first);
  `scale` `[H, N, P/G, D]`; `zero` the same shape, or None when symmetric.
- mode "fp8": `codes` float8_e4m3fn `[H, N, P, D]`; `scale` `[H, N, P, 1]` (one per token and head); `zero` None.

Heads lead so the pools shard over KV heads; pages come next so a page table indexes one axis.
"""

from __future__ import annotations

import jax.numpy as jnp

from kvtuner_jax.modes import PoolArrays, mode_of
from kvtuner_jax.specs import KVSpec


def _dtype_name(cache_dtype) -> str:
    return jnp.dtype(cache_dtype).name


def check_spec(spec: KVSpec, page_size: int, head_dim: int) -> None:
    """Raises ValueError when `spec` cannot be laid out for this page size and head_dim (or names no known mode)."""
    mode_of(spec).validate(spec, page_size, head_dim)


def arrays(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype=jnp.bfloat16) -> PoolArrays:
    """Shapes and dtype names of a pool's `(codes, scale, zero)` (kvtuner_jax.modes.PoolArrays)."""
    return mode_of(spec).arrays(spec, heads, pages, page_size, head_dim, _dtype_name(cache_dtype))


def codes_shape(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int) -> tuple[int, ...]:
    return arrays(spec, heads, pages, page_size, head_dim).codes.shape


def scale_shape(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int) -> tuple[int, ...] | None:
    s = arrays(spec, heads, pages, page_size, head_dim).scale
    return None if s is None else s.shape


def zero_shape(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int) -> tuple[int, ...] | None:
    z = arrays(spec, heads, pages, page_size, head_dim).zero
    return None if z is None else z.shape


def codes_dtype(spec: KVSpec, cache_dtype=jnp.bfloat16):
    # page_size/head_dim only shape the arrays, never their dtype; 8 x 8 lays out in every shipped mode
    return jnp.dtype(mode_of(spec).arrays(spec, 1, 1, 8, 8, _dtype_name(cache_dtype)).codes.dtype)


def page_size_of(spec: KVSpec, codes, head_dim: int) -> int:
    """Page size P of a pool, read from its codes array's shape."""
    return mode_of(spec).page_size_of(spec, tuple(codes.shape), head_dim)


def bytes_per_page(spec: KVSpec, heads: int, page_size: int, head_dim: int, cache_dtype=jnp.bfloat16) -> int:
    """Bytes one physical page of this store takes (codes + scales + zeros), all heads."""
    return arrays(spec, heads, 1, page_size, head_dim, cache_dtype).nbytes


def allocate(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype=jnp.bfloat16):
    """Zero-filled `(codes, scale, zero)` for a pool; scale/zero are None where the layout has none."""
    check_spec(spec, page_size, head_dim)
    a = arrays(spec, heads, pages, page_size, head_dim, cache_dtype)
    # distinct buffers for scale and zero (jit donates the cache, and one buffer may not be donated twice)
    return tuple(None if x is None else jnp.zeros(x.shape, jnp.dtype(x.dtype)) for x in (a.codes, a.scale, a.zero))
