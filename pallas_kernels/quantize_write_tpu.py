"""Packed page write, TPU kernel (Pallas, Mosaic): quantize whole pages, pack, write them into the pool.

Grid (page m, KV head h). The page tile [P, D] comes in through a BlockSpec (pipelined); it is quantized and packed in
VMEM (`tile_quant`, mask/matmul style: Mosaic cannot split the lane axis in a reshape) and DMA'd to physical page
dest[m] of head h. dest is scalar-prefetched into SMEM. The pool stays in HBM (`pl.ANY`) and is aliased input ->
output, so under `jax.jit(..., donate_argnums=...)` only the written pages change and nothing is copied.

Why DMA rather than an output BlockSpec whose index map reads dest: an output block is written back on every step,
and a step with dest[m] < 0 would have to write *some* page; a DMA under `pl.when(dest[m] >= 0)` writes nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvtuner_jax.quant import scale_dtype_of
from kvtuner_jax.specs import KVSpec
from pallas_kernels import tile_quant


def _kernel(dest_ref, pages_ref, *refs, spec: KVSpec, n_pool: int):
    # dest_ref: SMEM [M] int32. pages_ref: VMEM [P, D] (page m, head h). refs: n_pool aliased pool inputs (HBM,
    # unused), the n_pool pool outputs (HBM, whole: codes [H, N, rows, cols], scale/zero [H, N, srows, scols]), then
    # n_pool VMEM scratch tiles of one page of one head in the same layout.
    outs = refs[n_pool : 2 * n_pool]
    tiles = refs[2 * n_pool :]
    m = pl.program_id(0)
    h = pl.program_id(1)
    d = dest_ref[m]

    @pl.when(d >= 0)
    def _():
        x = pages_ref[...]
        if spec.quantized:
            vals = tile_quant.quantize_tile(
                x,
                bits=spec.bits,
                group_size=spec.group_size,
                axis=spec.axis,
                symmetric=spec.symmetric,
                scale_dtype=scale_dtype_of(spec.scale_dtype),
                reshape=False,
            )
        else:
            vals = (x,)
        for tile, v in zip(tiles, vals, strict=False):
            tile[...] = v.astype(tile.dtype)
        for tile, out in zip(tiles, outs, strict=True):
            pltpu.sync_copy(tile, out.at[h, d])


def _interpret_params(interpret):
    """False -> compiled; True -> `pltpu.InterpretParams()`; an `InterpretParams` (e.g. race detection) as given."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _write(codes, scale, zero, pages, dest, *, spec: KVSpec, interpret: bool):
    h, m, p, d = pages.shape
    pool = [a for a in (codes, scale, zero) if a is not None]
    n = len(pool)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(m, h),
        in_specs=[
            pl.BlockSpec((None, None, p, d), lambda i, j, dest: (j, i, 0, 0)),
            *[pl.BlockSpec(memory_space=pl.ANY) for _ in pool],
        ],
        out_specs=[pl.BlockSpec(memory_space=pl.ANY) for _ in pool],
        scratch_shapes=[pltpu.VMEM(a.shape[2:], a.dtype) for a in pool],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, spec=spec, n_pool=n),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in pool],
        input_output_aliases={2 + i: i for i in range(n)},  # operand 0 is dest (scalar prefetch), 1 the pages
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret_params(interpret),
        name=f"quantize_write_b{spec.bits}_{spec.axis}",
    )(dest.astype(jnp.int32), pages, *pool)
    return tile_quant.pool_outputs(out, scale, zero)


def quantize_write(codes, scale, zero, pages, dest, *, spec: KVSpec, interpret: bool = False):
    """Quantize `pages` [H, M, P, D] per `spec`, pack, and write page m to physical page dest[m] (skip if < 0).

    codes/scale/zero: the pool in `pallas_kernels.layout` (scale/zero None where the layout has none). Returns the
    updated `(codes, scale, zero)`. The pool is aliased input -> output: inside a jit that donates the pool the
    write is in place. dest must not repeat a physical page. `interpret=True` runs under `pltpu.InterpretParams()`
    (CPU); an `InterpretParams` instance is used as given (e.g. 2 cores with race detection).
    """
    if pages.shape[1] == 0:  # nothing leaves the tail this step; an empty grid is not a valid kernel launch
        return codes, scale, zero
    return _write(codes, scale, zero, pages, dest, spec=spec, interpret=interpret)
