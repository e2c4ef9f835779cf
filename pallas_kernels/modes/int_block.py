"""Mode `int_block`: mode `int`'s per-token integer codes, with each page's scale and zero-point rows stored in the
page's own block, after its codes.

Why: on an H100 a kernel streams a 4/4 page of K and V (six TMA copies in mode `int`: two 4 KB code tiles and four
128-byte rows) 5-7% slower than the same bytes laid out one block a pool a page (two copies), and 2/2's pages 11-15%
slower (`benchmarks/tma_stream.py --layouts stored,kvblocks`, BENCHMARKS.md 2026-12-07): the small row copies, not
the bytes, cost. 4/4's decode attention runs at that stored ceiling, so this layout is what lifts it. The numerics are
exactly mode `int`'s (axis "token" only): the same codes, scales and zero-points, stored in other places.

Layout (H KV heads, N pages, page size P, head_dim D, bits b, group size G, scale dtype of 2 bytes): codes uint8
`[H, N, P + R, W]` with W = D * b / 8 (a token's packed code row) and R = ceil(P * (D / G) * 2 * (2 if asymmetric
else 1) / W): rows 0 to P - 1 are the page's code rows, as mode `int` stores them but swizzled (row r's 16-byte
chunk c at c ^ (r S / 128 mod S / 16) within each span of S = min(128, W) bytes, rows of 32 bytes or more:
`swizzle_rows`), as TMA's swizzle would put them in shared memory, so that the kernel copies a whole block in one
plain copy and still reads its code tile without bank conflicts; the R rows after them hold the
page's scales `[P, D/G]` then its zero-points `[P, D/G]`, little-endian bytes, row-major, zero-padded to whole rows
(no padding where P * (D / G) * 2 is a multiple of W, e.g. 2-, 4- and 8-bit codes at D = G = 128 and pages of 32 or
more). Scale and zero arrays: none. Bytes per page: mode `int`'s plus that padding.

Kernels: the Mosaic GPU decode kernel on Hopper (`paged_attention_mgpu`, which copies each page's block whole, in one
plain copy, and reads its code tile through a swizzled view), at pages of 64; compiled on an H100 it equals the
reference (2026-12-07) and, at batch 32 x 16K, takes 0.91-0.92x mode `int`'s time for 2/2 and 4/2 and 0.99x for 4/4
(BENCHMARKS.md). A GPU write kernel (`int_block_kernels`, Triton lowering; compiled on an H100 bit-exact against the
reference and as fast as mode `int`'s, 24 us for one layer's K of 32 pages, 2026-12-07), and no Triton or TPU
attention kernel and no TPU write kernel (those run the reference, warned once): an opt-in layout for Hopper GPUs,
where mode `int` stays the default everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib

from kvtuner_jax.modes import ArraySpec, Mode, PoolArrays
from kvtuner_jax.specs import SCALE_DTYPE_BYTES, KVSpec


def row_bytes(spec: KVSpec, head_dim: int) -> int:
    """W: bytes of one token's packed code row."""
    return head_dim * spec.bits // 8


def param_bytes(spec: KVSpec, page_size: int, head_dim: int) -> int:
    """Bytes of one page's scales and zero-points (one KV head)."""
    per = 1 if spec.symmetric else 2
    return page_size * (head_dim // spec.group_size) * SCALE_DTYPE_BYTES[spec.scale_dtype] * per


def param_rows(spec: KVSpec, page_size: int, head_dim: int) -> int:
    """R: rows of W bytes after the code rows that hold the page's scales and zero-points (zero-padded)."""
    return -(-param_bytes(spec, page_size, head_dim) // row_bytes(spec, head_dim))


def as_int(spec: KVSpec) -> KVSpec:
    """The mode-`int` spec with the same numerics."""
    return dataclasses.replace(spec, mode="int")


class IntBlockMode(Mode):
    name = "int_block"
    valid_bits = (2, 4, 8)

    def validate(self, spec: KVSpec, page_size: int | None, head_dim: int) -> None:
        if spec.bits not in self.valid_bits:
            raise ValueError(f"bits={spec.bits} is not valid for mode 'int_block' (one of 2, 4, 8; 16 is unquantized)")
        if spec.axis != "token":
            raise ValueError(
                f"axis={spec.axis!r}: mode 'int_block' stores per-token groups (axis 'token'); per-channel groups "
                "are mode 'int'"
            )
        if spec.scale_dtype not in SCALE_DTYPE_BYTES:
            raise ValueError(f"scale_dtype={spec.scale_dtype!r} is not one of {sorted(SCALE_DTYPE_BYTES)}")
        from pallas_kernels.modes.int_mode import MODE as INT

        INT.validate(as_int(spec), page_size, head_dim)  # group size and packing: mode int's own checks
        if page_size is not None and swizzle_bytes(row_bytes(spec, head_dim)) and page_size % 8:
            raise ValueError(
                f"page_size={page_size}: mode 'int_block' stores code rows swizzled in groups of 8; use a multiple of 8"
            )

    def arrays(self, spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype: str):
        rows = page_size + param_rows(spec, page_size, head_dim)
        return PoolArrays(ArraySpec((heads, pages, rows, row_bytes(spec, head_dim)), "uint8"), None, None)

    def page_size_of(self, spec: KVSpec, codes_shape: tuple[int, ...], head_dim: int) -> int:
        rows = codes_shape[2]
        for p in range(rows, 0, -1):  # rows grow with the page size, so the first match is the only one
            if p + param_rows(spec, p, head_dim) == rows:
                return p
        raise ValueError(f"a block of {rows} rows is no page size's layout for {spec}")

    def describe(self, spec: KVSpec) -> str:
        return f"{spec.bits} token G{spec.group_size} {'sym' if spec.symmetric else 'asym'} block"

    def quantize_pages(self, pages, spec: KVSpec):
        from pallas_kernels.modes.int_mode import MODE as INT

        codes, scale, zero = INT.quantize_pages(pages, as_int(spec))
        return join(codes, scale, zero, spec, pages.shape[-1]), None, None

    def dequantize_pages(self, codes, scale, zero, spec: KVSpec, dtype):
        from pallas_kernels.modes.int_mode import MODE as INT

        head_dim = codes.shape[-1] * 8 // spec.bits
        c, s, z = split(codes, spec, head_dim)
        return INT.dequantize_pages(c, s, z, as_int(spec), dtype)

    def write_kernel(self, backend: str):
        return importlib.import_module("pallas_kernels.modes.int_block_kernels").write_kernel(backend)

    def attention_kernel(self, backend: str, k_spec: KVSpec, v_spec: KVSpec):
        if backend != "gpu":
            return None
        return importlib.import_module("pallas_kernels.paged_attention_mgpu").block_attention_kernel(k_spec, v_spec)


def swizzle_bytes(w: int) -> int:
    """S: the span over which code rows of W bytes are stored swizzled (as TMA's swizzle S would lay them out in
    shared memory for a warpgroup MMA tile), or 0 where rows stay plain (under 32 bytes)."""
    s = min(128, w)
    return s if s >= 32 else 0


def swizzle_rows(codes):
    """Code rows `[..., P, W]` with each row's 16-byte chunk c moved to c ^ (r x S / 128 mod S / 16) (r: the row,
    S: `swizzle_bytes(W)`), within each S-byte span of the row: what TMA's swizzle does to rows in shared memory, so a
    kernel that copies them plain reads them as a swizzled tile. Its own inverse."""
    import jax.numpy as jnp

    p, w = codes.shape[-2:]
    s = swizzle_bytes(w)
    if not s:
        return codes
    if p % 8:
        raise ValueError(f"swizzled code rows come in groups of 8, got {p} rows")
    n = s // 16  # chunks a span
    # the XOR depends on the row's place in each group of 8 only: static chunk permutations, no gather (kernels run
    # this too, under the interpreter)
    x = codes.reshape(*codes.shape[:-2], p // 8, 8, w // s, n, 16)
    rows = []
    for j in range(8):
        f = (j * s // 128) % n
        rows.append(jnp.stack([x[..., j, :, c ^ f, :] for c in range(n)], axis=-2))
    return jnp.stack(rows, axis=-4).reshape(codes.shape)


def join(codes, scale, zero, spec: KVSpec, head_dim: int):
    """Mode int's per-token `codes [..., P, W]`, `scale`/`zero` `[..., P, D/G]` (zero None when symmetric) -> the
    blocks `[..., P + R, W]` uint8 (code rows swizzled, `swizzle_rows`)."""
    import jax
    import jax.numpy as jnp

    codes = swizzle_rows(codes)
    lead, p, w = codes.shape[:-2], codes.shape[-2], codes.shape[-1]
    params = [
        jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*lead, -1) for x in (scale, zero) if x is not None
    ]  # little-endian bytes of each value, row-major
    flat = jnp.concatenate(params, axis=-1)
    r = param_rows(spec, p, head_dim)
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, r * w - flat.shape[-1])])
    return jnp.concatenate([codes, flat.reshape(*lead, r, w)], axis=-2)


def split(blocks, spec: KVSpec, head_dim: int):
    """Inverse of `join`: blocks `[..., P + R, W]` -> (codes `[..., P, W]`, scale, zero | None `[..., P, D/G]`)."""
    import jax

    from kvtuner_jax.quant import scale_dtype_of

    lead, rows, w = blocks.shape[:-2], blocks.shape[-2], blocks.shape[-1]
    p = MODE.page_size_of(spec, (1, 1, rows, w), head_dim)
    g = head_dim // spec.group_size
    nb = SCALE_DTYPE_BYTES[spec.scale_dtype]
    flat = blocks[..., p:, :].reshape(*lead, -1)
    sdt = scale_dtype_of(spec.scale_dtype)

    def values(first):
        raw = flat[..., first : first + p * g * nb].reshape(*lead, p, g, nb)
        return jax.lax.bitcast_convert_type(raw, sdt)

    scale = values(0)
    zero = None if spec.symmetric else values(p * g * nb)
    return swizzle_rows(blocks[..., :p, :]), scale, zero


MODE = IntBlockMode()
