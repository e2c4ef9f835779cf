"""Packed page write of mode `int_block`, GPU kernel (Pallas, Triton lowering): quantize whole pages and store each
as its block, bit for bit what `IntBlockMode.quantize_pages` and the reference scatter give.

It follows mode `int`'s write kernel (`pallas_kernels.quantize_write_gpu`): one program per (page m, KV head h,
block of `rows` tokens; blocks of 16 of 2 warps by default, `quantize_write_gpu.default_tiling`); the tile [rows, D]
comes in through a BlockSpec and is quantized and packed by `tile_quant.quantize_tile` (mode `int`'s
numerics, which never depend on how f32 division rounds); the pool `[H, N, P + R, W]` uint8 is aliased input ->
output and written directly (`pl.ANY`) at physical page dest[m] of head h, or not at all when dest[m] < 0. What
differs is where the bytes go, and every one of them goes there in a single store with computed addresses (the
Triton lowering turns integer-array indices into pointer arithmetic), since a tile in registers cannot be permuted:

- code row r's 16-byte chunk c lands at chunk c ^ f(r) of its S-byte span (`int_block.swizzle_rows`: TMA's swizzle,
  so that the attention kernel's plain copy of the block reads as a swizzled tile);
- each scale and zero-point value (16 bits, little-endian) lands as two bytes after the code rows, scales first,
  row-major `[P, D/G]`, as `int_block.join` lays them out;
- the padding bytes that fill the last parameter row are stored as zeros (no two stores of a program touch one byte
  with different values, so no ordering between a program's threads is needed).

Scope: page_size and head_dim powers of two (Triton block sizes), as mode `int`'s write kernel. Tested under the
interpreter bit for bit against the reference and lowered for CUDA on CPU (CI), and compiled on an H100 against the
reference (2026-12-07, `KVTUNER_TEST_COMPILED=1 pytest tests/test_int_block_write.py`, 14 passed). Until then it was
offered only under an environment variable; since, mode `int_block` writes its GPU pages with it (`write_kernel`).
Timed in the same call on that H100 (`benchmarks/attention.py --quantize-write`, one layer's K for 32 whole pages):
24.0 us (4-bit) and 24.3 (2-bit), against mode `int`'s write kernel's 24.0 and 21.3 and the jnp reference's 60.9
and 49.0 timed earlier that day (BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvtuner_jax.quant import scale_dtype_of
from kvtuner_jax.specs import KVSpec
from pallas_kernels import quantize_write_gpu, tile_quant
from pallas_kernels.modes import int_block


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def swizzled_columns(p: int, w: int, first=0):
    """[P, W] int32: the byte column where code row `first` + r's byte c is stored (`int_block.swizzle_rows`'s
    permutation)."""
    rows = first + lax.broadcasted_iota(jnp.int32, (p, w), 0)
    cols = lax.broadcasted_iota(jnp.int32, (p, w), 1)
    s = int_block.swizzle_bytes(w)
    if not s:
        return cols
    n = s // 16
    f = ((rows % 8) * s // 128) % n
    chunk = (cols % s) // 16
    return cols - cols % s + jnp.bitwise_xor(chunk, f) * 16 + cols % 16


def _store_bytes(ref, h, d, p: int, w: int, first: int, values, t0=0):
    """Store 16-bit `values` [T, G'] of tokens t0 .. t0 + T - 1 as little-endian bytes at flat byte
    `first` + 2 x (t G' + j) of page d's parameter rows (the rows after its P code rows)."""
    u = lax.bitcast_convert_type(values, jnp.uint16).astype(jnp.int32)
    t = t0 + lax.broadcasted_iota(jnp.int32, u.shape, 0)
    j = lax.broadcasted_iota(jnp.int32, u.shape, 1)
    off = first + 2 * (t * u.shape[1] + j)
    for k in range(2):  # low byte, then high byte
        at = off + k
        ref[h, d, p + at // w, at % w] = jnp.right_shift(u, 8 * k).__and__(0xFF).astype(jnp.uint8)


def _kernel(dest_ref, pages_ref, blocks_in_ref, blocks_ref, *, spec: KVSpec, p: int):
    del blocks_in_ref  # aliased to blocks_ref
    m = pl.program_id(0)
    h = pl.program_id(1)
    k = pl.program_id(2)  # which block of tokens of the page
    d = dest_ref[m]
    rows, head_dim = pages_ref.shape
    t0 = k * rows  # the block's first token
    w = int_block.row_bytes(spec, head_dim)

    @pl.when(d >= 0)
    def _():
        codes, scale, zero = tile_quant.quantize_tile(
            pages_ref[...],
            bits=spec.bits,
            group_size=spec.group_size,
            axis="token",
            symmetric=spec.symmetric,
            scale_dtype=scale_dtype_of(spec.scale_dtype),
            reshape=True,
        )
        code_rows = t0 + lax.broadcasted_iota(jnp.int32, (rows, w), 0)
        blocks_ref[h, d, code_rows, swizzled_columns(rows, w, t0)] = codes
        nbytes = int_block.param_bytes(spec, p, head_dim)
        _store_bytes(blocks_ref, h, d, p, w, 0, scale, t0)
        if zero is not None:
            _store_bytes(blocks_ref, h, d, p, w, nbytes // 2, zero, t0)
        pad = int_block.param_rows(spec, p, head_dim) * w - nbytes
        if pad:
            # zeros after the last value, as `join` pads, by the page's first block: a power-of-two tile whose spare
            # lanes repeat the last pad byte (the same zero to the same byte, so they do not race with anything)
            @pl.when(k == 0)
            def _():
                at = jnp.minimum(nbytes + lax.broadcasted_iota(jnp.int32, (_pow2(pad),), 0), nbytes + pad - 1)
                blocks_ref[h, d, p + at // w, at % w] = jnp.zeros(at.shape, jnp.uint8)


@functools.partial(jax.jit, static_argnames=("spec", "interpret", "rows", "num_warps"))
def _write(blocks, pages, dest, *, spec: KVSpec, interpret: bool, rows: int, num_warps: int):
    h, m, p, d = pages.shape
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, p=p),
        grid=(m, h, p // rows),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),  # dest, whole
            pl.BlockSpec((None, None, rows, d), lambda i, j, k: (j, i, k, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        out_shape=jax.ShapeDtypeStruct(blocks.shape, blocks.dtype),
        input_output_aliases={2: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"quantize_write_int_block_b{spec.bits}",
    )(dest.astype(jnp.int32), pages, blocks)


def unsupported(pages, *, spec: KVSpec) -> str | None:
    """Why this kernel cannot write these pages (the dispatcher falls back to the reference under "auto"), or None:
    mode int's Triton write kernel's shape limits, which are Triton's."""
    return quantize_write_gpu.unsupported(pages, spec=spec)


def quantize_write(codes, scale, zero, pages, dest, *, spec: KVSpec, interpret: bool = False, **tiling):
    """Quantize `pages` [H, M, P, D] per `spec` (mode `int_block`) and write page m as its block at physical page
    dest[m] of the pool `codes` [H, N, P + R, W] (skip where dest[m] < 0); `scale` and `zero` are None (the blocks
    hold them). Returns `(codes, None, None)`. In place under a jit that donates the pool; dest must not repeat a
    physical page. tiling: `rows` (tokens a program writes) and `num_warps`, as mode int's write kernel takes them
    (`quantize_write_gpu.tiling`; `default_tiling` unless given)."""
    if scale is not None or zero is not None:
        raise ValueError("mode 'int_block' pools hold their scales and zero-points inside the blocks: pass None")
    if not quantize_write_gpu.launchable(codes, pages, spec=spec):
        return codes, None, None
    rows, num_warps = quantize_write_gpu.tiling(spec, pages.shape[2], **tiling)
    return _write(codes, pages, dest, spec=spec, interpret=interpret, rows=rows, num_warps=num_warps), None, None


def write_kernel(backend: str):
    """Mode `int_block`'s write kernel for `backend` (`Mode.write_kernel`): this one on "gpu" (`quantize_write` hands
    back what it cannot write, and the dispatcher writes that with the reference), None elsewhere (the reference
    writes, warned once)."""
    return quantize_write if backend == "gpu" else None
