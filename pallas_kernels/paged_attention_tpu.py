"""Paged attention over quantized pages, TPU kernel (Pallas, Mosaic), dequantizing inside the kernel.

Grid (batch b, KV head h, page i). The page table and num_tokens are scalar-prefetched into SMEM; the K/V block index
maps read them to DMA physical page `page_table[b, i]` of head h (packed codes, scales, zeros) straight from the pool.
All query heads of KV head h (G = Hq / H) and all query tokens form the rows of one tile `[G * Tq, D]`, so each page
is loaded once per KV head. Online softmax state (m, l, acc) lives in VMEM scratch across the page axis; the last
page step normalizes and writes `out` and `lse`.

Pages at or past the sequence's end are not computed, and their block index repeats the last valid page so the
pipeline fetches nothing new. INVALID (-1) entries are clamped into range and never read past num_tokens.

Tile math: `tile_quant.dequantize_tile` (mask/matmul style: unpack by a 0/1 spread matmul, shifts on int32, scale
expansion by a 0/1 matmul at full f32 precision), because Mosaic cannot split the lane axis in a reshape. The GPU
helpers in `tile_attention.py` are written for Triton's transposed, bf16-split scheme; the small online-softmax step
here is kept in `[rows, tokens]` orientation with 2-D `[rows, 1]` state, which is what Mosaic lays out well.

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


def _page_size(spec: KVSpec, codes) -> int:
    if spec.quantized and spec.axis == "channel":
        return codes.shape[2] * 8 // spec.bits
    return codes.shape[2]


def _store_refs(spec: KVSpec) -> int:
    """Arrays one store (K or V) passes to the kernel: codes (+ scale) (+ zero)."""
    if not spec.quantized:
        return 1
    return 2 if spec.symmetric else 3


def _load_page(refs, spec: KVSpec) -> jnp.ndarray:
    """One page of one KV head from its refs -> [P, D] f32."""
    if not spec.quantized:
        return refs[0][...].astype(jnp.float32)
    codes = refs[0][...]
    scale = refs[1][...]
    zero = None if spec.symmetric else refs[2][...]
    return tile_quant.dequantize_tile(
        codes,
        scale,
        zero,
        bits=spec.bits,
        group_size=spec.group_size,
        axis=spec.axis,
        symmetric=spec.symmetric,
        reshape=False,
    )


def _kernel(pt_ref, nt_ref, q_ref, *refs, k_spec: KVSpec, v_spec: KVSpec, sm_scale: float, page_size: int):
    # pt_ref: SMEM [B * max_pages] int32; nt_ref: SMEM [B] int32.
    # q_ref: [R, D] (R = G * Tq rows of KV head h). K then V refs, each: codes [rows, cols] (+ scale, zero
    # [srows, scols]) of one physical page of head h, in the pool layout.
    # out_ref: [R, D] f32; lse_ref: [R, 1] f32. Scratch: m, l [R, 1] f32 (running max / sum), acc [R, D] f32.
    nk = _store_refs(k_spec)
    nv = _store_refs(v_spec)
    k_refs, v_refs = refs[:nk], refs[nk : nk + nv]
    out_ref, lse_ref, m_ref, l_ref, acc_ref = refs[nk + nv :]
    b = pl.program_id(0)
    i = pl.program_id(2)
    nt = nt_ref[b]

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(i * page_size < nt)
    def _page():
        q = q_ref[...].astype(jnp.float32)  # [R, D]
        k = _load_page(k_refs, k_spec)  # [P, D]
        v = _load_page(v_refs, v_spec)  # [P, D]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * sm_scale  # [R, P]
        tok = i * page_size + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(tok < nt, s, -jnp.inf)  # num_tokens is a multiple of P; this keeps any other length exact
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # finite: this page has a valid token
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p, v, preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        l = l_ref[...]
        ok = l > 0
        l_safe = jnp.where(ok, l, 1.0)
        out_ref[...] = jnp.where(ok, acc_ref[...] / l_safe, 0.0)
        lse_ref[...] = jnp.where(ok, m_ref[...] + jnp.log(l_safe), -jnp.inf)


def _store_specs(spec: KVSpec, codes, scale, zero, page_map):
    arrs = [codes] if not spec.quantized else [codes, scale] + ([] if spec.symmetric else [zero])
    return arrs, [pl.BlockSpec((None, None, *a.shape[2:]), page_map) for a in arrs]


@functools.partial(jax.jit, static_argnames=("k_spec", "v_spec", "sm_scale", "interpret"))
def _attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, *, k_spec, v_spec,
               sm_scale, interpret):  # fmt: skip
    b, hq, t, d = q.shape
    h, n = k_codes.shape[:2]
    g = hq // h
    r = g * t
    mp = page_table.shape[1]
    p = _page_size(k_spec, k_codes)

    def page_map(bi, hi, i, pt, nt):
        last = jnp.maximum((nt[bi] + p - 1) // p - 1, 0)  # past the end: repeat the last valid page (no new DMA)
        page = pt[bi * mp + jnp.minimum(i, last)]
        return hi, jnp.minimum(jnp.maximum(page, 0), n - 1), 0, 0

    k_arrs, k_specs = _store_specs(k_spec, k_codes, k_scale, k_zero, page_map)
    v_arrs, v_specs = _store_specs(v_spec, v_codes, v_scale, v_zero, page_map)
    row_map = lambda bi, hi, i, pt, nt: (bi, hi, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, mp),
        in_specs=[pl.BlockSpec((None, None, r, d), row_map), *k_specs, *v_specs],
        out_specs=[pl.BlockSpec((None, None, r, d), row_map), pl.BlockSpec((None, None, r, 1), row_map)],
        scratch_shapes=[
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((r, d), jnp.float32),
        ],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, k_spec=k_spec, v_spec=v_spec, sm_scale=sm_scale, page_size=p),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, h, r, d), jnp.float32), jax.ShapeDtypeStruct((b, h, r, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"paged_attention_k{k_spec.bits}{k_spec.axis[0]}_v{v_spec.bits}{v_spec.axis[0]}",
    )(
        page_table.astype(jnp.int32).reshape(-1),
        num_tokens.astype(jnp.int32),
        q.reshape(b, h, r, d),  # query head hq = h * G + j reads KV head h (repeat_kv grouping); rows = (j, token)
        *k_arrs,
        *v_arrs,
    )
    return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)


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
):
    """q [B, Hq, Tq, D] against the quantized pages of each sequence -> (out [B, Hq, Tq, D] f32, lse [B, Hq, Tq] f32).

    page_table [B, max_pages] int32 (physical page per logical page; entries past the end are ignored);
    num_tokens [B] int32, a multiple of the page size. Same semantics as `paged_attention_reference`: out is
    normalized over the pages only; num_tokens 0 gives out 0 and lse -inf. `interpret=True` runs under
    `pltpu.InterpretParams()` (CPU).
    """
    d = q.shape[-1]
    p = _page_size(k_spec, k_codes)
    if _page_size(v_spec, v_codes) != p:
        raise ValueError(f"K and V page sizes differ: {p} vs {_page_size(v_spec, v_codes)}")
    layout.check_spec(k_spec, p, d)
    layout.check_spec(v_spec, p, d)
    return _attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens,
                      k_spec=k_spec, v_spec=v_spec, sm_scale=float(sm_scale), interpret=interpret)  # fmt: skip
