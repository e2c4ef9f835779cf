"""Paged attention over one layer's *quantized pages*, dequantizing inside the kernel.

The full-precision tail and the new tokens of the step are attended by the cache in plain jnp and merged with this
result through the returned log-sum-exp (flash-decoding style, exact). Pages hold only whole, already-quantized pages
of tokens that precede every query, so there is no causal mask here, only a length mask (`num_tokens`, a multiple of
the page size).

GQA: query head `hq` reads KV head `hq // (Hq // H)` (HuggingFace's repeat_kv grouping).

This file holds the shared validation, the pure-jnp reference (the oracle) and the public dispatcher. Pages are read
through their store's mode (`kvtuner_jax.modes`): the reference dequantizes with the mode's numerics, and the
dispatcher runs the kernel a mode offers for the (K spec, V spec) pair on the backend (today's
`paged_attention_{gpu,tpu}` when both K and V are "int"/"bf16"), or the reference with a one-time warning when no
mode offers one. Backend kernels live beside it and are tested against `paged_attention_reference`.
"""

from __future__ import annotations

import inspect
import sys

import jax
import jax.numpy as jnp

from kvtuner_jax import modes
from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout
from pallas_kernels.quantize_write import check_pool, dequantize_pages

KERNEL_PRECISIONS = ("high", "bf16")  # paged-attention operand precision: ~16-bit bf16 splits, or plain bf16
PRECISIONS = ("auto", *KERNEL_PRECISIONS)  # "auto": chosen per layer by `resolve_precision`


def resolve_precision(precision: str, k_spec: KVSpec, v_spec: KVSpec) -> str:
    """The kernel precision of one layer: "high" and "bf16" as asked; "auto" is "bf16" for per-channel (KIVI)
    quantized keys and "high" otherwise.

    Why: on SmolLM2's real queries, keys and values (benchmarks/precision_error.py, BENCHMARKS.md 2026-12-05) the
    error bf16 operands add to a KIVI layer's attention output is at most 15% of what quantization already costs in
    the same layer (8-bit keys; at most 3-10% with 2- and 4-bit keys), so, the two being independent, the total
    grows by at most ~1%; while the GPU kernel for those layers runs ~1.5x faster at bf16 (no room in the padded
    query columns for the operand parts side by side). Per-token and 16-bit layers run about as fast at "high" (within
    10% either way on an H100 and an H200, 2026-12-05), so they keep it, and 16-bit layers stay within ~1e-5 of the
    float32 reference.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision != "auto":
        return precision
    return "bf16" if k_spec.quantized and k_spec.axis == "channel" else "high"


def validate(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, k_spec, v_spec) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_heads, q_len, head_dim], got shape {q.shape}")
    b, hq, _, d = q.shape
    h, n = k_codes.shape[:2]
    if hq % h:
        raise ValueError(f"q_heads={hq} is not a multiple of kv_heads={h}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [{b}, max_pages], got {page_table.shape}")
    if num_tokens.shape != (b,):
        raise ValueError(f"num_tokens must be [{b}], got {num_tokens.shape}")
    for name, spec, codes, scale, zero in (
        ("k", k_spec, k_codes, k_scale, k_zero),
        ("v", v_spec, v_codes, v_scale, v_zero),
    ):
        p = layout.page_size_of(spec, codes, d)
        check_pool(codes, scale, zero, spec, layout.arrays(spec, h, n, p, d), f"{name}_")


def gather_pages(codes, scale, zero, spec: KVSpec, page_table, head_dim: int) -> jnp.ndarray:
    """Dequantized tokens of each sequence's pages: [B, H, max_pages * P, D] float32 (pages past the end included)."""
    n = codes.shape[1]
    pt = jnp.clip(page_table, 0, n - 1)  # INVALID (-1) entries are masked by length; never wrap around
    c = codes[:, pt]  # [H, B, max_pages, rows, cols]
    s = None if scale is None else scale[:, pt]
    z = None if zero is None else zero[:, pt]
    x = dequantize_pages(c, s, z, spec)  # [H, B, max_pages, P, D]
    h, b, mp, p, d = x.shape
    return jnp.transpose(x.reshape(h, b, mp * p, d), (1, 0, 2, 3))


def paged_attention_reference(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, *, k_spec, v_spec, sm_scale
):
    """Reference. q [B, Hq, Tq, D] -> (out [B, Hq, Tq, D] f32 normalized over the pages, lse [B, Hq, Tq] f32).

    Where num_tokens[b] == 0: out is 0 and lse is -inf.
    """
    validate(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, k_spec, v_spec)
    b, hq, t, d = q.shape
    h = k_codes.shape[0]
    k = gather_pages(k_codes, k_scale, k_zero, k_spec, page_table, d)  # [B, H, S, D]
    v = gather_pages(v_codes, v_scale, v_zero, v_spec, page_table, d)
    qg = q.astype(jnp.float32).reshape(b, h, hq // h, t, d)
    s = jnp.einsum("BHGTD,BHSD->BHGTS", qg, k) * sm_scale
    valid = jnp.arange(k.shape[2])[None, :] < num_tokens[:, None]  # [B, S]
    s = jnp.where(valid[:, None, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("BHGTS,BHSD->BHGTD", p, v) / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)
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
    backend: str = "auto",
    interpret: bool = False,
    precision: str = "high",
):
    """Public entry: dispatches to the reference or a Pallas kernel by `backend`.

    precision: "high" (float32 operands, or bf16 splits carrying ~16 bits: agrees with the reference to ~1e-5),
    "bf16" (tensor-core operands rounded to bf16 once, as FlashAttention-style kernels and a bf16 KV cache do:
    ~1e-3 relative; about 1.5x faster on per-channel key layouts on an H100) or "auto" (per layer,
    `resolve_precision`: bf16 for per-channel keys, high otherwise; the engine's default). Kernels that compute in
    float32 anyway (the TPU and fp8 kernels) meet any request and are not told.

    backend: "auto" (GPU kernel on GPU, TPU kernel on TPU, reference elsewhere), "reference", "gpu", "tpu".
    `interpret=True` runs a Pallas kernel in interpret mode (CPU tests). The kernel comes from K's mode, else V's
    (`Mode.attention_kernel(backend, k_spec, v_spec)`; for int/bf16 pairs the lazily imported
    `pallas_kernels.paged_attention_gpu` / `paged_attention_tpu`, each exposing `paged_attention` with this signature
    minus `backend`), so an unused backend or mode costs no import or compile time. When neither mode offers one,
    the reference runs and a warning is logged once.
    """
    precision = resolve_precision(precision, k_spec, v_spec)
    requested, backend = backend, resolve_backend(backend)
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens)
    if backend == "reference":
        return paged_attention_reference(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=sm_scale)
    validate(*args, k_spec, v_spec)
    kernel = kernel_for(backend, k_spec, v_spec)
    if kernel is None:
        km, vm = modes.mode_of(k_spec), modes.mode_of(v_spec)
        modes.warn_once(
            (km.name, vm.name, "attention", backend),
            f"no {backend} paged-attention kernel for K mode {km.name!r} with V mode {vm.name!r}; this layer's "
            "attention runs on the jnp reference path",
        )
        return paged_attention_reference(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=sm_scale)
    # A kernel module may say which shapes it cannot run (`unsupported(q, k_codes, v_codes, *, k_spec, v_spec)`):
    # under "auto" that layer falls back to the reference (logged once); an explicit backend raises.
    reason = kernel_unsupported(kernel, q, k_codes, v_codes, k_spec=k_spec, v_spec=v_spec)
    if reason:
        if requested != "auto":
            raise ValueError(f"{backend} paged attention: {reason}; use backend='reference' or 'auto'")
        modes.warn_once((k_spec, v_spec, q.shape[-1], "attention", backend), f"{reason}: this layer runs the reference")
        return paged_attention_reference(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=sm_scale)
    kw = {"precision": precision} if "precision" in inspect.signature(kernel).parameters else {}
    return kernel(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=sm_scale, interpret=interpret, **kw)


def kernel_for(backend: str, k_spec: KVSpec, v_spec: KVSpec):
    """The paged-attention kernel the storage modes offer for this (K, V) pair on `backend` (K's mode asked first,
    then V's), or None (then the reference runs)."""
    km, vm = modes.mode_of(k_spec), modes.mode_of(v_spec)
    return km.attention_kernel(backend, k_spec, v_spec) or vm.attention_kernel(backend, k_spec, v_spec)


def kernel_unsupported(kernel, *args, **kw) -> str | None:
    """Why `kernel` cannot run these inputs, from its module's optional `unsupported(*args, **kw)`, or None."""
    check = getattr(sys.modules.get(getattr(kernel, "__module__", "")), "unsupported", None)
    return check(*args, **kw) if check else None


def resolve_backend(backend: str) -> str:
    """ "auto" -> the kernel for this platform ("gpu", "tpu") or "reference" on CPU; checks the name."""
    if backend == "auto":
        return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "reference")
    if backend not in ("reference", "gpu", "tpu"):
        raise ValueError(f"backend {backend!r} is not one of 'auto', 'reference', 'gpu', 'tpu'")
    return backend
