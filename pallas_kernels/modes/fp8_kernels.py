"""Pallas kernels of mode fp8 (GPU: Triton lowering; TPU: Mosaic): page writes, bit-exact against the mode's
reference, and paged attention over fp8/bf16 pages.

Both follow today's int write kernels (`pallas_kernels.quantize_write_{gpu,tpu}`): grid (page m, KV head h); the page
tile [P, D] comes in through a BlockSpec, is quantized by `quantize_tile` (the shared tile math, the mode's numerics
in plain jnp) and lands at physical page dest[m] of head h, or nowhere when dest[m] < 0. The pool (codes
float8_e4m3fn [H, N, P, D], scale [H, N, P, 1]) is aliased input -> output, so under a donating jit only the written
pages change.

- GPU: direct stores into the whole pool (`pl.ANY`). Triton casts f32 -> e4m3fn with round-to-nearest-even
  (sm_89 or newer, e.g. H100) and its f32 `/` is approximate, so compiled runs divide with PTX `div.rn.f32`.
  page_size and head_dim must be powers of two (Triton block sizes).
- TPU: the quantized tile goes to VMEM scratch and is DMA'd to the page (a step that writes nothing issues no DMA).

Attention (`paged_attention_gpu`, `paged_attention_tpu`): K and V each fp8 or bf16; first, untuned kernels (one page
per step, IEEE f32 dots, no split over the sequence), tested in interpret mode and lowered for H100 / TPU on CPU,
never yet run on a device. fp8 mixed with int codes has no kernel: the dispatcher runs the reference for such layers
and logs a warning once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvtuner_jax.quant import scale_dtype_of
from kvtuner_jax.specs import KVSpec
from pallas_kernels.modes.fp8 import E4M3_MAX, EPS


def quantize_tile(x: jnp.ndarray, scale_dtype, div=jnp.divide):
    """One page of one head, x [P, D] (any float) -> (codes float8_e4m3fn [P, D], scale [P, 1] in scale_dtype).

    Exactly `FP8Mode.quantize_pages` on a tile; `div` is the f32 division (a correctly rounded one on NVIDIA)."""
    xf = x.astype(jnp.float32)
    xf = jnp.where(jnp.isfinite(xf), xf, 0.0)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)  # [P, 1]
    fmax = float(jnp.finfo(scale_dtype).max)
    scale = jnp.minimum(div(jnp.maximum(amax, EPS), jnp.float32(E4M3_MAX)), fmax).astype(scale_dtype)
    y = jnp.clip(div(xf, scale.astype(jnp.float32)), -E4M3_MAX, E4M3_MAX)
    return y.astype(jnp.float8_e4m3fn), scale


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------------------------------
# GPU (Triton)


def _div_rn(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Correctly rounded f32 division on NVIDIA GPUs (Triton's `/` is `div.full.f32`, up to 2 ulp off)."""
    from jax.experimental.pallas import triton as plgpu

    a, b = jnp.broadcast_arrays(a.astype(jnp.float32), b.astype(jnp.float32))
    (out,) = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return out


def _gpu_kernel(dest_ref, pages_ref, _codes_in, _scale_in, codes_ref, scale_ref, *, scale_dtype, div):
    # dest_ref: [M] int32 (whole); pages_ref: [P, D] (page m, head h); then the aliased pool inputs (unused) and the
    # pool outputs, whole: codes [H, N, P, D] float8_e4m3fn, scale [H, N, P, 1].
    m = pl.program_id(0)
    h = pl.program_id(1)
    d = dest_ref[m]

    @pl.when(d >= 0)
    def _():
        codes, scale = quantize_tile(pages_ref[...], scale_dtype, div)
        codes_ref[h, d] = codes
        scale_ref[h, d] = scale


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _write_gpu(codes, scale, pages, dest, *, spec: KVSpec, interpret: bool):
    from jax.experimental.pallas import triton as plgpu

    h, m, p, d = pages.shape
    kernel = functools.partial(
        _gpu_kernel, scale_dtype=scale_dtype_of(spec.scale_dtype), div=jnp.divide if interpret else _div_rn
    )
    return pl.pallas_call(
        kernel,
        grid=(m, h),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),  # dest, whole
            pl.BlockSpec((None, None, p, d), lambda i, j: (j, i, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_shape=[jax.ShapeDtypeStruct(codes.shape, codes.dtype), jax.ShapeDtypeStruct(scale.shape, scale.dtype)],
        input_output_aliases={2: 0, 3: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="quantize_write_fp8",
    )(dest.astype(jnp.int32), pages, codes, scale)


def quantize_write_gpu(codes, scale, zero, pages, dest, *, spec: KVSpec, interpret: bool = False):
    """fp8 page write on GPU: quantize `pages` [H, M, P, D] and write page m to physical page dest[m] (skip if < 0).

    Same contract as `pallas_kernels.quantize_write_gpu.quantize_write` (zero is None for fp8; dest must not repeat a
    physical page; in place under a donating jit)."""
    _, _, p, d = pages.shape
    if not (_is_pow2(p) and _is_pow2(d)):
        raise ValueError(
            f"the GPU (Triton) fp8 write kernel needs page_size and head_dim to be powers of two, got page_size={p}, "
            f"head_dim={d}; use backend='reference'"
        )
    if pages.shape[1] == 0:  # nothing leaves the tail this step; an empty grid is not a valid launch
        return codes, scale, zero
    c, s = _write_gpu(codes, scale, pages, dest, spec=spec, interpret=interpret)
    return c, s, None


# ---------------------------------------------------------------------------------------------------------------------
# TPU (Mosaic)


def _tpu_kernel(
    dest_ref, pages_ref, _codes_in, _scale_in, codes_out, scale_out, codes_tile, scale_tile, *, scale_dtype
):
    # dest_ref: SMEM [M] int32; pages_ref: VMEM [P, D] (page m, head h); pool inputs (HBM, aliased, unused); pool
    # outputs (HBM, whole): codes [H, N, P, D], scale [H, N, P, 1]; VMEM scratch: codes [P, D], scale [P, 1].
    m = pl.program_id(0)
    h = pl.program_id(1)
    d = dest_ref[m]

    @pl.when(d >= 0)
    def _():
        from jax.experimental.pallas import tpu as pltpu

        codes, scale = quantize_tile(pages_ref[...], scale_dtype)
        codes_tile[...] = codes
        scale_tile[...] = scale
        pltpu.sync_copy(codes_tile, codes_out.at[h, d])
        pltpu.sync_copy(scale_tile, scale_out.at[h, d])


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _write_tpu(codes, scale, pages, dest, *, spec: KVSpec, interpret):
    from jax.experimental.pallas import tpu as pltpu

    h, m, p, d = pages.shape
    if isinstance(interpret, pltpu.InterpretParams):
        mode = interpret
    else:
        mode = pltpu.InterpretParams() if interpret else False
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(m, h),
        in_specs=[
            pl.BlockSpec((None, None, p, d), lambda i, j, dest: (j, i, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM((p, d), codes.dtype), pltpu.VMEM((p, 1), scale.dtype)],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, scale_dtype=scale_dtype_of(spec.scale_dtype)),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(codes.shape, codes.dtype), jax.ShapeDtypeStruct(scale.shape, scale.dtype)],
        input_output_aliases={2: 0, 3: 1},  # operand 0 is dest (scalar prefetch), 1 the pages
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=mode,
        name="quantize_write_fp8",
    )(dest.astype(jnp.int32), pages, codes, scale)


def quantize_write_tpu(codes, scale, zero, pages, dest, *, spec: KVSpec, interpret=False):
    """fp8 page write on TPU; same contract as `quantize_write_gpu` above. `interpret=True` runs under
    `pltpu.InterpretParams()` (CPU); an `InterpretParams` instance is used as given."""
    if pages.shape[1] == 0:
        return codes, scale, zero
    c, s = _write_tpu(codes, scale, pages, dest, spec=spec, interpret=interpret)
    return c, s, None


# ---------------------------------------------------------------------------------------------------------------------
# Paged attention over fp8 (and bf16) pages, GPU (Triton)

ATTENTION_MODES = ("fp8", "bf16")  # per-token layouts [H, N, P, D] this kernel reads (bf16: values, no scale)


def _attn_kernel(nt_ref, pt_ref, q_ref, *refs, P: int, N: int, MP: int, k_scaled: bool, v_scaled: bool, c_scale: float):
    # nt_ref [1] int32; pt_ref [MP] int32 (this sequence); q_ref [R, D] f32 (GQA group x query tokens, padded rows);
    # refs: K codes [N, P, D] (this KV head), K scale [N, P, 1] if fp8, V codes, V scale if fp8; o_ref [R, D] f32
    # normalized; lse_ref [R] f32 (base e).
    it = iter(refs)
    kc_ref = next(it)
    ks_ref = next(it) if k_scaled else None
    vc_ref = next(it)
    vs_ref = next(it) if v_scaled else None
    o_ref, lse_ref = next(it), next(it)
    hi = jax.lax.Precision.HIGHEST  # f32 operands, IEEE dot: fp8 codes are exact in f32, and so is the reference
    npages = jnp.minimum(nt_ref[0] // P, MP)  # whole pages only; never past the table (the reference caps there too)
    q = q_ref[...] * c_scale  # [R, D], base-2 scores
    r, d = q.shape

    def body(i, carry):
        m, l, acc = carry  # [R], [R], [R, D]
        pg = jnp.clip(pt_ref[i], 0, N - 1)
        k = kc_ref[pg].astype(jnp.float32)  # [P, D]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=hi, preferred_element_type=jnp.float32)
        if k_scaled:
            s = s * ks_ref[pg, :, 0].astype(jnp.float32)[None, :]  # per-token scale folded into the scores [R, P]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        if v_scaled:
            p = p * vs_ref[pg, :, 0].astype(jnp.float32)[None, :]  # per-token V scale folded into the weights
        v = vc_ref[pg].astype(jnp.float32)  # [P, D]
        pv = jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=hi, preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[:, None] + pv

    init = (jnp.full((r,), -jnp.inf, jnp.float32), jnp.zeros((r,), jnp.float32), jnp.zeros((r, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, npages, body, init)
    ok = l > 0
    o_ref[...] = acc / jnp.where(ok, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(ok, (m + jnp.log2(jnp.where(ok, l, 1.0))) / LOG2E, -jnp.inf)


LOG2E = 1.4426950408889634


@functools.partial(jax.jit, static_argnames=("k_spec", "v_spec", "sm_scale", "interpret"))
def paged_attention_gpu(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, *, k_spec, v_spec, sm_scale,
    interpret=False,
):  # fmt: skip
    """Paged attention of q [B, Hq, Tq, D] over fp8/bf16 pages; same contract as `paged_attention_reference`.

    Grid (batch, KV head): one program holds the GQA group's query rows (padded to R >= 16, a power of two) and walks
    the sequence's pages with an online softmax; fp8 scales are folded into the scores and the probabilities, so each
    element costs one fp8 -> f32 convert and its share of an IEEE f32 dot. A first, untuned kernel (no split over
    the sequence). page_size and head_dim must be powers of two, at least 16."""
    from jax.experimental.pallas import triton as plgpu

    b, hq, tq, d = q.shape
    h, n, p = k_codes.shape[:3]
    if not (_is_pow2(p) and p >= 16 and _is_pow2(d) and d >= 16):
        raise ValueError(f"page_size={p} and head_dim={d} must be powers of two, at least 16 (fp8 GPU attention)")
    rows = (hq // h) * tq
    r = max(16, 1 << (rows - 1).bit_length())
    qf = q.astype(jnp.float32).reshape(b, h, rows, d)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, r - rows), (0, 0)))  # [B, H, R, D]
    mp = page_table.shape[1]
    k_scaled, v_scaled = k_scale is not None, v_scale is not None
    args = [num_tokens.astype(jnp.int32), page_table.astype(jnp.int32), qf]
    specs = [
        pl.BlockSpec((1,), lambda i, j: (i,)),
        pl.BlockSpec((None, mp), lambda i, j: (i, 0)),
        pl.BlockSpec((None, None, r, d), lambda i, j: (i, j, 0, 0)),
    ]
    for arr in (k_codes, k_scale, v_codes, v_scale):
        if arr is not None:
            args.append(arr)
            specs.append(pl.BlockSpec((None, *arr.shape[1:]), lambda i, j: (j, 0, 0, 0)))
    kernel = functools.partial(
        _attn_kernel, P=p, N=n, MP=mp, k_scaled=k_scaled, v_scaled=v_scaled, c_scale=float(sm_scale) * LOG2E
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, None, r, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, r), lambda i, j: (i, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, h, r, d), jnp.float32), jax.ShapeDtypeStruct((b, h, r), jnp.float32)],
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="paged_attention_fp8",
    )(*args)
    return o[:, :, :rows].reshape(b, hq, tq, d), lse[:, :, :rows].reshape(b, hq, tq)


# ---------------------------------------------------------------------------------------------------------------------
# Paged attention over fp8 (and bf16) pages, TPU (Mosaic)


def _tpu_attn_kernel(nt_ref, pt_ref, q_ref, *refs, P: int, MP: int, k_scaled: bool, v_scaled: bool, c_scale: float):
    # Scalar prefetch: nt_ref [B], pt_ref [B, MP] (SMEM). q_ref [R, D] f32 (this sequence and KV head). Per grid step
    # (b, h, i) the page pt[b, i] of this head: K codes [P, D], K scale [P, 1] if fp8, V codes, V scale if fp8.
    # Outputs: o_ref [D, R] f32 normalized, lse_ref [1, R] (base e). Scratch: m, l [1, R] (base 2), acc [D, R].
    # Scores are kept transposed, [P, R], so per-token scales [P, 1] broadcast along lanes and the running
    # statistics are lane rows [1, R].
    it = iter(refs)
    kc_ref = next(it)
    ks_ref = next(it) if k_scaled else None
    vc_ref = next(it)
    vs_ref = next(it) if v_scaled else None
    o_ref, lse_ref, m_sc, l_sc, acc_sc = (next(it) for _ in range(5))
    b, i = pl.program_id(0), pl.program_id(2)
    npages = jnp.minimum(nt_ref[b] // P, MP)
    hi = jax.lax.Precision.HIGHEST

    @pl.when(i == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(i < npages)
    def _():
        q = q_ref[...] * c_scale  # [R, D]
        k = kc_ref[...].astype(jnp.float32)  # [P, D]
        s = jax.lax.dot_general(k, q, (((1,), (1,)), ((), ())), precision=hi, preferred_element_type=jnp.float32)
        if k_scaled:
            s = s * ks_ref[...].astype(jnp.float32)  # [P, R] * [P, 1]
        m = m_sc[...]
        m_new = jnp.maximum(m, jnp.max(s, axis=0, keepdims=True))  # [1, R]
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new)  # [P, R]
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=0, keepdims=True)
        m_sc[...] = m_new
        if v_scaled:
            p = p * vs_ref[...].astype(jnp.float32)
        v = vc_ref[...].astype(jnp.float32)  # [P, D]
        pv = jax.lax.dot_general(v, p, (((0,), (0,)), ((), ())), precision=hi, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * alpha + pv  # [D, R]

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        l = l_sc[...]
        ok = l > 0
        o_ref[...] = acc_sc[...] / jnp.where(ok, l, 1.0)
        lse_ref[...] = jnp.where(ok, (m_sc[...] + jnp.log2(jnp.where(ok, l, 1.0))) / LOG2E, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("k_spec", "v_spec", "sm_scale", "interpret"))
def paged_attention_tpu(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, *, k_spec, v_spec, sm_scale,
    interpret=False,
):  # fmt: skip
    """Paged attention of q [B, Hq, Tq, D] over fp8/bf16 pages on TPU; same contract as `paged_attention_reference`.

    Grid (batch, KV head, page): the page table and lengths are scalar-prefetched and pick each step's page through
    the BlockSpec index maps (pipelined DMA of one page of codes and scales); an online softmax runs in VMEM across
    the page axis. Steps past a sequence's pages still fetch a (clamped) table entry but compute nothing
    (`pl.when`). A first, untuned kernel (one page per step, f32 dots at HIGHEST precision)."""
    from jax.experimental.pallas import tpu as pltpu

    b, hq, tq, d = q.shape
    h, n, p = k_codes.shape[:3]
    rows = (hq // h) * tq
    r = -(-rows // 8) * 8
    qf = q.astype(jnp.float32).reshape(b, h, rows, d)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, r - rows), (0, 0)))  # [B, H, R, D]
    mp = page_table.shape[1]
    k_scaled, v_scaled = k_scale is not None, v_scale is not None

    def page_map(i, j, k, nt, pt):
        return (j, jnp.clip(pt[i, k], 0, n - 1), 0, 0)

    args, specs = [qf], [pl.BlockSpec((None, None, r, d), lambda i, j, k, nt, pt: (i, j, 0, 0))]
    for arr in (k_codes, k_scale, v_codes, v_scale):
        if arr is not None:
            args.append(arr)
            specs.append(pl.BlockSpec((None, None, p, arr.shape[3]), page_map))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, mp),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, None, d, r), lambda i, j, k, nt, pt: (i, j, 0, 0)),
            pl.BlockSpec((None, None, 1, r), lambda i, j, k, nt, pt: (i, j, 0, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((1, r), jnp.float32),
            pltpu.VMEM((1, r), jnp.float32),
            pltpu.VMEM((d, r), jnp.float32),
        ],
    )
    if isinstance(interpret, pltpu.InterpretParams):
        mode = interpret
    else:
        mode = pltpu.InterpretParams() if interpret else False
    kernel = functools.partial(
        _tpu_attn_kernel, P=p, MP=mp, k_scaled=k_scaled, v_scaled=v_scaled, c_scale=float(sm_scale) * LOG2E
    )
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, h, d, r), jnp.float32), jax.ShapeDtypeStruct((b, h, 1, r), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=mode,
        name="paged_attention_fp8",
    )(num_tokens.astype(jnp.int32), page_table.astype(jnp.int32), *args)
    o = jnp.swapaxes(o, -1, -2)[:, :, :rows].reshape(b, hq, tq, d)
    return o, lse[:, :, 0, :rows].reshape(b, hq, tq)


def attention_kernel(backend: str, k_spec: KVSpec, v_spec: KVSpec):
    """The fp8 attention kernel for this pair, or None (then the dispatcher runs the reference, warning once).

    `paged_attention_gpu` / `paged_attention_tpu` when K and V are each fp8 or bf16 (int codes mixed with fp8 are not
    handled here)."""
    from kvtuner_jax.modes import mode_name_of

    if mode_name_of(k_spec) in ATTENTION_MODES and mode_name_of(v_spec) in ATTENTION_MODES:
        return {"gpu": paged_attention_gpu, "tpu": paged_attention_tpu}.get(backend)
    return None
