"""Paged attention over quantized pages, TPU kernel (Pallas, Mosaic), dequantizing inside the kernel.

Grid (batch b, KV head h, page block i). The page table and num_tokens are scalar-prefetched into SMEM; a block holds
`pages_per_block` pages, each its own BlockSpec whose index map reads the table to DMA physical page
`page_table[b, i * ppb + j]` of head h (packed codes, scales, zeros) straight from the pool, double-buffered by the
Pallas pipeline. The pages are dequantized into one K and one V tile of [ppb * P, D / F] per field (F: codes per
byte of a token-axis store, else 1), so each step does one score matmul per key field.
All query heads of KV head h (G = Hq / H) and all query tokens form the rows of one tile `[G * Tq, D]`, so each page
is loaded once per KV head. Online softmax state (m, l, acc) lives in VMEM scratch across the page axis; the last
page step normalizes and writes `out` and `lse`.

Blocks past the sequence's end are not computed. Pages past the end map to the last valid page (finite values, which
the length mask drops; on later steps the unchanged block index means no new DMA). INVALID (-1) table entries are
clamped into range and never used.

Tile math (`tile_quant`, shared with the write kernels and the reference checks): token-axis pages are dequantized
in place as `tile_quant.dequantize_fields`: field j of every byte (a shift and a mask of the int32 bytes) is the tile
of channels j::per, so no code moves across lanes (Mosaic cannot split the lane axis in a reshape) and no matmul
unpacks them; the wrapper hands the kernel the query with its channels in the same field order and puts the output's
channels back. Channel-axis pages (tokens packed along rows) use `tile_quant.dequantize_tile`, unpacking by a 0/1
spread matmul. Group scales and zeros are expanded over their channels by 0/1 matmuls too; every such selection
matmul is exact as single-pass bf16 work (`tile_quant.select_dot`), where float32 HIGHEST matmuls would take ~6
passes. Per page at the Llama-3.1-8B shape, 4/4 with per-token groups of 32 went from 7.1M bf16 MAC-passes of
selection matmuls to 0.13M (`benchmarks/tpu_kernel_ops.py`; no TPU to time it). The GPU kernel instead folds scales
around bf16 magic operands (`tile_attention.py`), which Triton's tensor-core dots want. The online-softmax step is
the shared `tile_attention.online_softmax_step` (base 2), here in `[rows, tokens]` orientation with 2-D `[rows, 1]`
state, which is what Mosaic lays out well.

Numerics: float32 throughout (dequantized values are bit-identical to the reference's), so the kernel differs from
`paged_attention_reference` only by float32 reassociation in the dot products and the online softmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout, tile_quant
from pallas_kernels import tile_attention as ta


def _store_refs(spec: KVSpec) -> int:
    """Arrays one store (K or V) passes to the kernel: codes (+ scale) (+ zero)."""
    if not spec.quantized:
        return 1
    return 2 if spec.symmetric else 3


def _fields(spec: KVSpec) -> int:
    """Field tiles a page of this store is dequantized into (`tile_quant.num_fields`; 1 for 16-bit)."""
    return tile_quant.num_fields(spec.bits, spec.axis) if spec.quantized else 1


def _load_page(refs, spec: KVSpec) -> list[jnp.ndarray]:
    """One page of one KV head from its refs -> its `_fields(spec)` field tiles, [P, D / fields] f32 each (field j:
    channels j::fields)."""
    if not spec.quantized:
        return [refs[0][...].astype(jnp.float32)]
    codes = refs[0][...]
    scale = refs[1][...]
    zero = None if spec.symmetric else refs[2][...]
    kw = dict(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
    if spec.axis == "token":
        return tile_quant.dequantize_fields(codes, scale, zero, **kw)
    return [tile_quant.dequantize_tile(codes, scale, zero, axis=spec.axis, reshape=False, **kw)]


def _kernel(
    pt_ref,
    nt_ref,
    q_ref,
    *refs,
    k_spec: KVSpec,
    v_spec: KVSpec,
    sm_scale: float,
    page_size: int,
    ppb: int,
    max_tokens: int,
):
    # pt_ref: SMEM [B * max_pages] int32; nt_ref: SMEM [B] int32.
    # q_ref: [FK, R, D / FK] (R = G * Tq rows of KV head h; FK = key fields: slice j holds channels j::FK).
    # Then, for each of the ppb pages of this block, the K refs and then the V refs: codes [rows, cols]
    # (+ scale, zero [srows, scols]) of one physical page of head h, in the pool layout.
    # out_ref: [FV, R, D / FV] f32 (FV = value fields: slice j holds channels j::FV); lse_ref: [R, 1] f32.
    # Scratch: m, l [R, 1] f32 (running base-2 max / sum), acc [FV, R, D / FV] f32, and when ppb > 1 the block's
    # dequantized K and V field tiles, [FK, ppb * P, D / FK] and [FV, ppb * P, D / FV] f32.
    nk = _store_refs(k_spec)
    nv = _store_refs(v_spec)
    per_page = nk + nv
    pages = [refs[j * per_page : (j + 1) * per_page] for j in range(ppb)]
    out_ref, lse_ref, m_ref, l_ref, acc_ref, *bufs = refs[ppb * per_page :]
    b = pl.program_id(0)
    i = pl.program_id(2)
    nt = jnp.minimum(nt_ref[b], max_tokens)  # never count a page twice when num_tokens overstates the table
    block_tokens = ppb * page_size

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(i * block_tokens < nt)
    def _block():
        if ppb == 1:
            k = _load_page(pages[0][:nk], k_spec)  # FK x [P, D / FK]
            v = _load_page(pages[0][nk:], v_spec)  # FV x [P, D / FV]
        else:
            # Pages past the end were fetched as the last valid page (finite values); the length mask drops them.
            k_buf, v_buf = bufs
            for j, page in enumerate(pages):
                rows = slice(j * page_size, (j + 1) * page_size)  # sublane-aligned: P is a multiple of 8
                for buf, tiles in ((k_buf, _load_page(page[:nk], k_spec)), (v_buf, _load_page(page[nk:], v_spec))):
                    for f, x in enumerate(tiles):
                        buf[f, rows, :] = x
            k = [k_buf[f] for f in range(k_buf.shape[0])]  # FK x [ppb * P, D / FK]
            v = [v_buf[f] for f in range(v_buf.shape[0])]
        # Field j of the keys meets query channels j::FK: the same dot product, summed in another order.
        s = sum(
            lax.dot_general(
                q_ref[f].astype(jnp.float32), kf, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            for f, kf in enumerate(k)
        )  # [R, T]
        s = s * (sm_scale * ta.LOG2E)  # base 2, as the shared softmax step runs
        tok = i * block_tokens + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(tok < nt, s, -jnp.inf)
        m_new, alpha, p, l_new = ta.online_softmax_step(m_ref[...], l_ref[...], s, axis=1)  # state [R, 1]
        l_ref[...] = l_new
        for f, vf in enumerate(v):  # field j of the values gives output channels j::FV
            acc_ref[f] = alpha * acc_ref[f] + jnp.dot(p, vf, preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        l = l_ref[...]
        ok = l > 0
        l_safe = jnp.where(ok, l, 1.0)
        out_ref[...] = jnp.where(ok[None], acc_ref[...] / l_safe[None], 0.0)
        lse_ref[...] = jnp.where(ok, (m_ref[...] + jnp.log2(l_safe)) * ta.LN2, -jnp.inf)  # back to base e


def _store_arrays(spec: KVSpec, codes, scale, zero):
    return [codes] if not spec.quantized else [codes, scale] + ([] if spec.symmetric else [zero])


def _interpret_params(interpret):
    """False -> compiled; True -> `pltpu.InterpretParams()`; an `InterpretParams` (e.g. race detection) as given."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


@functools.partial(jax.jit, static_argnames=("k_spec", "v_spec", "sm_scale", "ppb", "interpret"))
def _attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, *, k_spec, v_spec,
               sm_scale, ppb, interpret):  # fmt: skip
    b, hq, t, d = q.shape
    h, n = k_codes.shape[:2]
    g = hq // h
    r = g * t
    mp = page_table.shape[1]
    p = layout.page_size_of(k_spec, k_codes, d)
    fk, fv = _fields(k_spec), _fields(v_spec)

    def page_map(j):
        def index(bi, hi, i, pt, nt):
            # Past the end: repeat the last valid page, so the pipeline fetches nothing new and the values are finite.
            last = jnp.minimum(jnp.maximum((nt[bi] + p - 1) // p - 1, 0), mp - 1)
            page = pt[bi * mp + jnp.minimum(i * ppb + j, last)]
            return hi, jnp.minimum(jnp.maximum(page, 0), n - 1), 0, 0  # INVALID (-1) -> in range, never used

        return index

    k_arrs = _store_arrays(k_spec, k_codes, k_scale, k_zero)
    v_arrs = _store_arrays(v_spec, v_codes, v_scale, v_zero)
    page_specs, page_args = [], []
    for j in range(ppb):
        for a in (*k_arrs, *v_arrs):
            page_specs.append(pl.BlockSpec((None, None, *a.shape[2:]), page_map(j)))
            page_args.append(a)
    row_map = lambda bi, hi, i, pt, nt: (bi, hi, 0, 0)
    field_map = lambda bi, hi, i, pt, nt: (bi, hi, 0, 0, 0)
    scratch = [
        pltpu.VMEM((r, 1), jnp.float32),
        pltpu.VMEM((r, 1), jnp.float32),
        pltpu.VMEM((fv, r, d // fv), jnp.float32),
    ]
    if ppb > 1:
        scratch += [pltpu.VMEM((fk, ppb * p, d // fk), jnp.float32), pltpu.VMEM((fv, ppb * p, d // fv), jnp.float32)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, pl.cdiv(mp, ppb)),
        in_specs=[pl.BlockSpec((None, None, fk, r, d // fk), field_map), *page_specs],
        out_specs=[pl.BlockSpec((None, None, fv, r, d // fv), field_map), pl.BlockSpec((None, None, r, 1), row_map)],
        scratch_shapes=scratch,
    )
    out, lse = pl.pallas_call(
        functools.partial(
            _kernel, k_spec=k_spec, v_spec=v_spec, sm_scale=sm_scale, page_size=p, ppb=ppb, max_tokens=mp * p
        ),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, h, fv, r, d // fv), jnp.float32),
            jax.ShapeDtypeStruct((b, h, r, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret_params(interpret),
        name=f"paged_attention_k{k_spec.bits}{k_spec.axis[0]}_v{v_spec.bits}{v_spec.axis[0]}",
    )(
        page_table.astype(jnp.int32).reshape(-1),
        num_tokens.astype(jnp.int32),
        # Query head hq = h * G + j reads KV head h (repeat_kv grouping); rows = (j, token); channels split into the
        # key fields (slice f: channels f::FK).
        q.reshape(b, h, r, d // fk, fk).transpose(0, 1, 4, 2, 3),
        *page_args,
    )
    out = out.transpose(0, 1, 3, 4, 2)  # [b, h, r, D / FV, FV]: channel i * FV + f
    return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)


def default_pages_per_block(page_size: int, max_pages: int) -> int:
    """Pages per grid step: about 128 tokens (one MXU-wide score tile), at most the table's width; 1 when pages do
    not stack on sublane boundaries (page size not a multiple of 8)."""
    if page_size % 8:
        return 1
    return max(1, min(max_pages, 128 // page_size))


def paged_attention(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    page_table,
    num_tokens,
    *,
    k_spec: KVSpec,
    v_spec: KVSpec,
    sm_scale: float,
    interpret: bool = False,
    pages_per_block: int | None = None,
):
    """q [B, Hq, Tq, D] against the quantized pages of each sequence -> (out [B, Hq, Tq, D] f32, lse [B, Hq, Tq] f32).

    page_table [B, max_pages] int32 (physical page per logical page; entries past the end are ignored);
    num_tokens [B] int32, a multiple of the page size. Same semantics as `paged_attention_reference`: out is
    normalized over the pages only; num_tokens 0 gives out 0 and lse -inf. `interpret=True` runs under
    `pltpu.InterpretParams()` (CPU); an `InterpretParams` instance is used as given.
    pages_per_block: pages per grid step (default `default_pages_per_block`); each page is its own pipelined
    BlockSpec, so more pages per step amortize the per-step cost.
    """
    d = q.shape[-1]
    p, pv = (layout.page_size_of(spec, codes, q.shape[-1]) for spec, codes in ((k_spec, k_codes), (v_spec, v_codes)))
    if pv != p:
        raise ValueError(f"K and V page sizes differ: {p} vs {pv}")
    layout.check_spec(k_spec, p, d)
    layout.check_spec(v_spec, p, d)
    ppb = pages_per_block or default_pages_per_block(p, page_table.shape[1])
    if ppb > 1 and p % 8:
        raise ValueError(f"pages_per_block={ppb} > 1 needs a page size that is a multiple of 8, got {p}")
    return _attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens,
                      k_spec=k_spec, v_spec=v_spec, sm_scale=float(sm_scale), ppb=ppb, interpret=interpret)  # fmt: skip
