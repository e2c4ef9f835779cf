"""Pool layout of one K or V store of one layer: the one place that says which arrays exist and their shapes.

For H KV heads, N physical pages, page size P, head_dim D and a `KVSpec` s (bits b, group size G):

- b == 16 (unquantized): `codes` holds the values themselves, `[H, N, P, D]` in the cache dtype; no scale/zero.
- axis "token", b < 16: `codes` uint8 `[H, N, P, D*b/8]` (packed along D, LSB first);
  `scale` `[H, N, P, D/G]` (scale dtype); `zero` the same shape, or None when symmetric.
- axis "channel", b < 16: `codes` uint8 `[H, N, P*b/8, D]` (packed along the page's tokens, LSB first);
  `scale` `[H, N, P/G, D]`; `zero` the same shape, or None when symmetric.

Heads lead so the pools shard over KV heads; pages come next so a page table indexes one axis.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvtuner_jax.quant import scale_dtype_of
from kvtuner_jax.specs import KVSpec


def check_spec(spec: KVSpec, page_size: int, head_dim: int) -> None:
    """Raises ValueError when `spec` cannot be laid out for this page size and head_dim."""
    if spec.bits not in (2, 4, 8, 16):
        raise ValueError(f"bits={spec.bits} is not one of 2, 4, 8, 16")
    if not spec.quantized:
        return
    if spec.axis == "token":
        if head_dim % spec.group_size:
            raise ValueError(f"group_size={spec.group_size} does not divide head_dim={head_dim} (axis 'token')")
        if (head_dim * spec.bits) % 8:
            raise ValueError(f"head_dim={head_dim} does not pack into whole bytes at {spec.bits} bits")
    else:
        if page_size % spec.group_size:
            raise ValueError(f"group_size={spec.group_size} does not divide page_size={page_size} (axis 'channel')")
        if (page_size * spec.bits) % 8:
            raise ValueError(f"page_size={page_size} does not pack into whole bytes at {spec.bits} bits")


def codes_shape(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int) -> tuple[int, ...]:
    if not spec.quantized:
        return (heads, pages, page_size, head_dim)
    if spec.axis == "token":
        return (heads, pages, page_size, head_dim * spec.bits // 8)
    return (heads, pages, page_size * spec.bits // 8, head_dim)


def scale_shape(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int) -> tuple[int, ...] | None:
    if not spec.quantized:
        return None
    if spec.axis == "token":
        return (heads, pages, page_size, head_dim // spec.group_size)
    return (heads, pages, page_size // spec.group_size, head_dim)


def codes_dtype(spec: KVSpec, cache_dtype=jnp.bfloat16):
    return jnp.dtype(jnp.uint8) if spec.quantized else jnp.dtype(cache_dtype)


def bytes_per_page(spec: KVSpec, heads: int, page_size: int, head_dim: int, cache_dtype=jnp.bfloat16) -> int:
    """Bytes one physical page of this store takes (codes + scales + zeros), all heads."""
    n = int(np.prod(codes_shape(spec, heads, 1, page_size, head_dim))) * codes_dtype(spec, cache_dtype).itemsize
    ss = scale_shape(spec, heads, 1, page_size, head_dim)
    if ss is not None:
        per = int(np.prod(ss)) * jnp.dtype(scale_dtype_of(spec.scale_dtype)).itemsize
        n += per * spec.params_per_group
    return n


def allocate(spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype=jnp.bfloat16):
    """Zero-filled `(codes, scale, zero)` for a pool; scale/zero are None where the layout has none."""
    check_spec(spec, page_size, head_dim)
    codes = jnp.zeros(codes_shape(spec, heads, pages, page_size, head_dim), codes_dtype(spec, cache_dtype))
    ss = scale_shape(spec, heads, pages, page_size, head_dim)
    if ss is None:
        return codes, None, None
    sdt = scale_dtype_of(spec.scale_dtype)
    scale = jnp.zeros(ss, sdt)
    zero = None if spec.symmetric else jnp.zeros(ss, sdt)  # a distinct buffer from scale (donation)
    return codes, scale, zero
