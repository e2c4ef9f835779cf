"""Decode-faithful evaluation of a quantized KV cache in one parallel pass (DESIGN.md, "Numerics contract").

When decode scores token t, the cache holds tokens 0..t: the first `Q(t) = max(0, floor((t - R) / P)) * P` of them
quantized in whole pages, the rest in the full-precision tail (a step appends, attends, and only then flushes full
pages). So token t sees token j <= t dequantized iff j < Q(t). Here K and V of every token are computed once in both
versions (quantized page by page exactly as the cache would, and full precision), and each (t, j) pair picks its
version with that mask: decode semantics, at prefill cost.

- Pages are `[pP, (p+1)P)` of each row; "channel" groups of G tokens stay inside a page. A trailing partial page is
  padded and quantized too, but never read dequantized, because `Q(t) <= t` is a multiple of P (only whole pages of
  tokens < t are ever in the quantized part).
- Scores and outputs in float32. Softmax is one softmax over the mixed score row; the output splits into
  `(p * m) @ v_hat + (p * (1 - m)) @ v` so K and V masks are independent (16-bit K or V skips its half).
- 16-bit K or V is used unchanged (no bf16 rounding), so an all-16-bit spec reproduces dense causal attention.

Rows are whole texts: position t of a row is its t-th token (positions 0..T-1); the `positions` argument of the
attention protocol is not consulted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kvtuner_jax import model
from kvtuner_jax.rotation import maybe_rotate
from kvtuner_jax.specs import KVSpec, LayerSpec
from pallas_kernels import layout
from pallas_kernels.quantize_write import dequantize_pages, quantize_pages


def quantized_prefix_length(t: jnp.ndarray, residual_length: int, page_size: int) -> jnp.ndarray:
    """Q(t) = max(0, floor((t - R) / P)) * P: how many of tokens 0..t sit in quantized pages when t is decoded."""
    return jnp.maximum(0, (t - residual_length) // page_size) * page_size


def page_fake_quantize(x: jnp.ndarray, spec: KVSpec, page_size: int) -> jnp.ndarray:
    """Quantize -> dequantize every page of each row, as the cache stores them.

    x: [B, T, H, D] (any float dtype). Returns float32 [B, T, H, D]. T is padded with zeros to whole pages (the pad
    only shares a page with tokens that are never read dequantized, see the module docstring).
    """
    b, t, h, d = x.shape
    layout.check_spec(spec, page_size, d)
    n = -(-t // page_size)
    xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * page_size - t), (0, 0), (0, 0)))
    pages = xf.reshape(b, n, page_size, h, d).transpose(3, 0, 1, 2, 4).reshape(h, b * n, page_size, d)  # [H, M, P, D]
    codes, scale, zero = quantize_pages(pages, spec)
    deq = dequantize_pages(codes, scale, zero, spec, dtype=jnp.float32)  # [H, M, P, D]
    deq = deq.reshape(h, b, n, page_size, d).transpose(1, 2, 3, 0, 4).reshape(b, n * page_size, h, d)
    return deq[:, :t]


def faithful_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, spec: LayerSpec, page_size: int) -> jnp.ndarray:
    """Causal attention where query t sees key/value j dequantized iff j < Q(t).

    q: [B, T, Hq, D]; k, v: [B, T, H, D] with H dividing Hq (GQA: query head i uses KV head i // (Hq / H)).
    Returns [B, T, Hq, D] in q's dtype. Scores are scaled by 1/sqrt(D).
    """
    b, t, hq, d = q.shape
    h = k.shape[2]
    if hq % h:
        raise ValueError(f"query heads ({hq}) are not a multiple of KV heads ({h})")
    qf = q.astype(jnp.float32).reshape(b, t, h, hq // h, d)  # [B, T, H, N, D]
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    pos = jnp.arange(t)
    mask_q = pos[None, :] < quantized_prefix_length(pos, spec.residual_length, page_size)[:, None]  # [T(query), S]
    causal = pos[None, :] <= pos[:, None]  # [T, S]
    scale = 1.0 / math.sqrt(d)

    s = jnp.einsum("BTHND,BSHD->BHNTS", qf, kf) * scale  # [B, H, N, T, S]
    if spec.k.quantized:
        k_hat = page_fake_quantize(k, spec.k, page_size)
        s = jnp.where(mask_q, jnp.einsum("BTHND,BSHD->BHNTS", qf, k_hat) * scale, s)
    s = jnp.where(causal, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    if spec.v.quantized:
        v_hat = page_fake_quantize(v, spec.v, page_size)
        m = mask_q.astype(jnp.float32)
        out = jnp.einsum("BHNTS,BSHD->BTHND", p * m, v_hat) + jnp.einsum("BHNTS,BSHD->BTHND", p * (1.0 - m), vf)
    else:
        out = jnp.einsum("BHNTS,BSHD->BTHND", p, vf)
    return out.reshape(b, t, hq, d).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class FaithfulQuantAttention:
    """Attention protocol object (kvtuner_jax.model.forward) scoring whole texts with decode-faithful KV quantization.

    layer_specs: one LayerSpec per layer (a manifest's `layer_specs()`); page_size: P. Hashable, so it can be a static
    argument of a jitted forward. Layers with `rotation` rotate Q and K by the block Hadamard of kvtuner_jax.rotation.
    """

    layer_specs: tuple[LayerSpec, ...]
    page_size: int

    def __post_init__(self):
        object.__setattr__(self, "layer_specs", tuple(self.layer_specs))
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")

    def __call__(self, layer: int, q, k, v, positions, state):
        if layer >= len(self.layer_specs):
            raise ValueError(f"layer {layer} has no spec ({len(self.layer_specs)} layer specs given)")
        spec = self.layer_specs[layer]
        q, k = maybe_rotate(spec, q, k)  # as the cache does: K stored rotated, Q rotated to match
        return faithful_attention(q, k, v, spec, self.page_size), state


def specs_of(manifest_or_specs) -> tuple[LayerSpec, ...]:
    """A Manifest (anything with `layer_specs()`) or a sequence of LayerSpec -> tuple of LayerSpec."""
    if hasattr(manifest_or_specs, "layer_specs"):
        return tuple(manifest_or_specs.layer_specs())
    return tuple(manifest_or_specs)


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def _forward_logits(params, tokens, *, cfg, attention):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = model.forward(params, cfg, tokens, positions, attention, None)
    return logits


def faithful_logits(params, cfg, tokens: jnp.ndarray, manifest_or_specs, page_size: int) -> jnp.ndarray:
    """Logits [B, T, V] (float32) of whole texts `tokens` [B, T] under decode-faithful quantized attention.

    manifest_or_specs: a Manifest or a sequence of one LayerSpec per layer. Jitted; recompiles per distinct spec tuple.
    """
    specs: Sequence[LayerSpec] = specs_of(manifest_or_specs)
    return _forward_logits(params, tokens, cfg=cfg, attention=FaithfulQuantAttention(tuple(specs), page_size))


# ---------------------------------------------------------------------------------------------------------------------
# Metrics. "Predicted tokens" are positions 0..T-2 of each row: logits at t predict tokens[t + 1].


def token_nll(logits: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """NLL (nats) of tokens[:, 1:] under logits[:, :-1]: logits [B, T, V], tokens [B, T] -> [B, T-1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def perplexity(logits: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """exp(mean NLL over predicted tokens), a scalar."""
    return jnp.exp(jnp.mean(token_nll(logits, tokens)))


def kl_per_token(logits_q: jnp.ndarray, logits_ref: jnp.ndarray) -> jnp.ndarray:
    """KL(p_ref || p_q) in nats at each predicted position: [B, T, V] x2 -> [B, T-1]."""
    lr = jax.nn.log_softmax(logits_ref[:, :-1].astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits_q[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lr) * (lr - lq), axis=-1)


def kl_vs_reference(logits_q: jnp.ndarray, logits_ref: jnp.ndarray) -> jnp.ndarray:
    """Mean KL(p_ref || p_q) (nats) over predicted tokens, a scalar."""
    return jnp.mean(kl_per_token(logits_q, logits_ref))


def top1_agreement(logits_q: jnp.ndarray, logits_ref: jnp.ndarray) -> jnp.ndarray:
    """Fraction of predicted positions where argmax of logits_q equals argmax of logits_ref, a scalar."""
    a = jnp.argmax(logits_q[:, :-1], axis=-1)
    r = jnp.argmax(logits_ref[:, :-1], axis=-1)
    return jnp.mean((a == r).astype(jnp.float32))
