"""Packed page write, GPU kernel (Pallas, Triton lowering): quantize whole pages, pack, write them into the pool.

One program per (page m, KV head h, block of `rows` tokens; `default_tiling` says how many): load the tile
[rows, D], quantize and pack it (`tile_quant`, reshape style), and store codes / scale / zero at its rows of physical
page dest[m] of head h, or nothing when dest[m] < 0. Blocks of fewer tokens give more programs: as whole pages of 4
warps, a decode step's 32 pages x 8 heads are 256 programs, ~8 warps an SM on an H100, and the kernel took 11 us for
5 MB; per-token pages now go in blocks of 16 tokens of 2 warps (1,024 programs, 7 us). Per-channel keys need whole
quantization groups of tokens in a block (`rows` a multiple of group_size). The pool arrays are aliased input ->
output, so under `jax.jit(..., donate_argnums=...)` the write happens in place and only the written pages are
touched.

Triton needs every in-kernel array size to be a power of two, so page_size and head_dim must be powers of two
(every group size that divides them then is one too). Other shapes: use the reference backend.

Numerics: bit-exact against `quantize_write_reference`, compiled or interpreted: `tile_quant` never lets a result
depend on how float32 division rounds (Triton's `/` on NVIDIA is approximate, and so is XLA's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvtuner_jax.quant import scale_dtype_of
from kvtuner_jax.specs import KVSpec
from pallas_kernels import tile_quant


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _kernel(dest_ref, pages_ref, *refs, spec: KVSpec):
    # dest_ref: [M] int32 (whole); pages_ref: [P, D] (page m, head h); refs = aliased pool inputs (unused), then the
    # pool outputs, whole: codes [H, N, rows, cols], scale/zero [H, N, srows, scols] (when quantized).
    n_pool = len(refs) // 2
    codes_ref, *param_refs = refs[n_pool:]
    m = pl.program_id(0)
    h = pl.program_id(1)
    k = pl.program_id(2)  # which block of tokens of the page
    d = dest_ref[m]

    def store(ref, tile):  # the tile's rows of the pool's page: block k holds the k-th run of rows of each array
        ref[h, d, pl.ds(k * tile.shape[0], tile.shape[0])] = tile

    @pl.when(d >= 0)
    def _():
        x = pages_ref[...]
        if not spec.quantized:
            store(codes_ref, x.astype(codes_ref.dtype))
            return
        codes, scale, zero = tile_quant.quantize_tile(
            x,
            bits=spec.bits,
            group_size=spec.group_size,
            axis=spec.axis,
            symmetric=spec.symmetric,
            scale_dtype=scale_dtype_of(spec.scale_dtype),
            reshape=True,
        )
        store(codes_ref, codes)
        store(param_refs[0], scale)
        if zero is not None:
            store(param_refs[1], zero)


def default_tiling(spec: KVSpec, p: int) -> tuple[int, int]:
    """(rows, num_warps) a write uses unless told: per-token codes in blocks of 16 tokens, 2 warps a program; other
    pages (per-channel keys, unquantized) a whole page, 4 warps. Traced on an H100 (2026-12-07, BENCHMARKS.md), one
    layer's K for 32 pages of 64 at D 128: per-token 2-, 4- and 8-bit codes, modes int and int_block, 11 us a kernel
    as whole pages of 4 warps, 10 (9 at 8 rows) in blocks of 4 warps, 7 in blocks of 16 or 8 tokens of 2 warps.
    Per-channel and unquantized pages were not timed in blocks, so they keep the whole page."""
    if spec.quantized and spec.axis == "token":
        return min(p, 16), 2
    return p, 4


def check_rows(rows: int, num_warps: int, p: int, spec: KVSpec) -> int:
    """`rows` if a write can use it (and `num_warps`), or ValueError naming what a block of tokens must be."""
    if not (_is_pow2(rows) and rows <= p and p % rows == 0):
        raise ValueError(f"write kernel rows={rows}: expected a power of two dividing page_size={p}")
    if spec.quantized and spec.axis == "channel" and rows % spec.group_size:
        raise ValueError(
            f"write kernel rows={rows}: per-channel keys are quantized {spec.group_size} tokens at a time, so rows "
            f"must be a multiple of group_size={spec.group_size}"
        )
    if spec.quantized and rows * spec.bits % 8:
        raise ValueError(f"write kernel rows={rows}: {spec.bits}-bit codes need rows * bits to be whole bytes")
    if num_warps not in (1, 2, 4, 8):
        raise ValueError(f"write kernel num_warps={num_warps}: expected 1, 2, 4 or 8")
    return rows


@functools.partial(jax.jit, static_argnames=("spec", "interpret", "rows", "num_warps"))
def _write(codes, scale, zero, pages, dest, *, spec: KVSpec, interpret: bool, rows: int, num_warps: int):
    h, m, p, d = pages.shape
    pool = [a for a in (codes, scale, zero) if a is not None]
    out = pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        grid=(m, h, p // rows),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),  # dest, whole
            pl.BlockSpec((None, None, rows, d), lambda i, j, k: (j, i, k, 0)),
            *[pl.BlockSpec(memory_space=pl.ANY) for _ in pool],
        ],
        out_specs=[pl.BlockSpec(memory_space=pl.ANY) for _ in pool],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in pool],
        input_output_aliases={2 + i: i for i in range(len(pool))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"quantize_write_b{spec.bits}_{spec.axis}",
    )(dest.astype(jnp.int32), pages, *pool)
    return tile_quant.pool_outputs(out, scale, zero)


def unsupported(pages, *, spec: KVSpec) -> str | None:
    """Why this kernel cannot write these pages (the dispatcher falls back to the reference under "auto"), or None."""
    del spec
    _, _, p, d = pages.shape
    if not (_is_pow2(p) and _is_pow2(d)):
        return (
            f"the GPU (Triton) write kernel needs page_size and head_dim to be powers of two, got page_size={p}, "
            f"head_dim={d}"
        )
    return None


def quantize_write(
    codes,
    scale,
    zero,
    pages,
    dest,
    *,
    spec: KVSpec,
    interpret: bool = False,
    rows: int | None = None,
    num_warps: int | None = None,
):
    """Quantize `pages` [H, M, P, D] per `spec`, pack, and write page m to physical page dest[m] (skip if < 0).

    codes/scale/zero: the pool in `pallas_kernels.layout` (scale/zero None where the layout has none). Returns the
    updated `(codes, scale, zero)`. The pool is aliased input -> output: call this inside a jit that donates the pool
    and the write is in place (eagerly, XLA copies the pool first).
    dest must not repeat a physical page (two programs would race on it). rows / num_warps: tokens a program writes
    and its warps (None: `default_tiling`; `check_rows` says what they may be).
    """
    if not launchable(codes, pages, spec=spec):
        return codes, scale, zero
    rows, num_warps = tiling(spec, pages.shape[2], rows, num_warps)
    return _write(codes, scale, zero, pages, dest, spec=spec, interpret=interpret, rows=rows, num_warps=num_warps)


def tiling(spec: KVSpec, p: int, rows: int | None = None, num_warps: int | None = None) -> tuple[int, int]:
    """The (rows, num_warps) a write of pages of `p` tokens runs with: those given, else `default_tiling`'s; checked."""
    d_rows, d_warps = default_tiling(spec, p)
    rows, num_warps = d_rows if rows is None else rows, d_warps if num_warps is None else num_warps
    return check_rows(rows, num_warps, p, spec), num_warps


def launchable(codes, pages, *, spec: KVSpec) -> bool:
    """The checks before a Triton write kernel's launch (this one's, and mode int_block's): raises where it cannot
    write these pages (`unsupported`) or the pool is past 32-bit offsets; False where there is nothing to write."""
    reason = unsupported(pages, spec=spec)
    if reason:
        raise ValueError(f"{reason}; use backend='reference'")
    if pages.shape[1] == 0:  # nothing leaves the tail this step; an empty grid is not a valid kernel launch
        return False
    from pallas_kernels.paged_attention_gpu import check_index_range

    check_index_range(codes=codes)  # same 32-bit offset limit as the attention kernel
    return True
