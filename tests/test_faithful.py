"""Decode-faithful attention vs an independent step-by-step decode simulation in float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtuner_jax import faithful
from kvtuner_jax.specs import KVSpec, LayerSpec
from pallas_kernels.quantize_write import dequantize_pages, quantize_pages


def _deq_page(x_page: np.ndarray, spec: KVSpec) -> np.ndarray:
    """One page [P, H, D] as the cache stores it when it leaves the tail (the pure-jnp oracle), back as float64."""
    pages = jnp.asarray(x_page.transpose(1, 0, 2)[:, None])  # [H, 1, P, D]
    c, s, z = quantize_pages(pages, spec)
    return np.asarray(dequantize_pages(c, s, z, spec), np.float64)[:, 0].transpose(1, 0, 2)


def _simulate_decode(q, k, v, spec: LayerSpec, page_size: int) -> np.ndarray:
    """Token by token: the cache holds tokens 0..t; pages [pP, (p+1)P) are quantized once they leave the tail.

    After appending token t (and attending), decode flushes every whole page past the residual window, so when token t
    attends the quantized prefix is what was flushed after step t-1 *plus nothing new*; we recompute it directly from
    the rule "token t sees 0..t, the first max(0, (t - R) // P) * P of them quantized".
    """
    b, t_len, hq, d = q.shape
    h = k.shape[2]
    n = hq // h
    out = np.zeros((b, t_len, hq, d))
    for bi in range(b):
        flushed_k: list[np.ndarray] = []  # dequantized pages, in order, quantized once each
        flushed_v: list[np.ndarray] = []
        for t in range(t_len):
            qlen = max(0, (t - spec.residual_length) // page_size) * page_size
            while len(flushed_k) * page_size < qlen:  # pages leaving the tail are quantized exactly once
                p0 = len(flushed_k) * page_size
                kp = k[bi, p0 : p0 + page_size]
                vp = v[bi, p0 : p0 + page_size]
                flushed_k.append(_deq_page(kp, spec.k) if spec.k.quantized else kp.astype(np.float64))
                flushed_v.append(_deq_page(vp, spec.v) if spec.v.quantized else vp.astype(np.float64))
            ks = np.concatenate(flushed_k + [k[bi, qlen : t + 1].astype(np.float64)], axis=0)[: t + 1]  # [t+1, H, D]
            vs = np.concatenate(flushed_v + [v[bi, qlen : t + 1].astype(np.float64)], axis=0)[: t + 1]
            for i in range(hq):
                s = ks[:, i // n] @ q[bi, t, i].astype(np.float64) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, t, i] = p @ vs[:, i // n]
    return out


def _spec(kb, vb, k_axis="token", k_g=16, v_g=16, r=0, sym=False):
    return LayerSpec(
        k=KVSpec(bits=kb, axis=k_axis, group_size=k_g, symmetric=sym),
        v=KVSpec(bits=vb, axis="token", group_size=v_g, symmetric=sym),
        residual_length=r,
    )


CASES = [
    # (T, P, spec): T not a multiple of P in most; R = 0, R a multiple of P, R not a multiple of P.
    (37, 8, _spec(2, 2, "channel", k_g=8, r=0)),
    (37, 8, _spec(4, 2, "channel", k_g=4, r=8)),
    (29, 4, _spec(8, 4, "token", k_g=16, v_g=8, r=5)),
    (32, 8, _spec(2, 16, "token", k_g=8, r=3)),
    (33, 16, _spec(16, 2, "token", v_g=16, r=0)),
    (40, 8, _spec(4, 4, "channel", k_g=8, r=16, sym=True)),
]


@pytest.mark.parametrize("t_len,page,spec", CASES)
def test_faithful_matches_step_by_step_decode(t_len, page, spec):
    rng = np.random.default_rng(t_len * 100 + page)
    b, hq, h, d = 2, 4, 2, 16
    q = rng.normal(size=(b, t_len, hq, d)).astype(np.float32) * 2.0
    k = rng.normal(size=(b, t_len, h, d)).astype(np.float32) * 1.5 + rng.normal(size=(1, 1, h, d)).astype(np.float32)
    v = rng.normal(size=(b, t_len, h, d)).astype(np.float32)
    got = np.asarray(jax.jit(faithful.faithful_attention, static_argnums=(3, 4))(q, k, v, spec, page))
    want = _simulate_decode(q, k, v, spec, page)
    # Both sides dequantize the same f32 inputs through the same oracle, so the codes are identical; what remains is
    # float32 vs float64 in scores (|s| ~ 10) and softmax: relative error ~1e-6, outputs are O(1). 2e-5 leaves room
    # for f32 accumulation over T <= 40 terms, and a single wrong mask entry would move outputs by ~1e-2 or more.
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # The quantized path is actually exercised: the result differs from plain attention somewhere.
    plain = _simulate_decode(q, k, v, _spec(16, 16), page)
    assert np.max(np.abs(want - plain)) > 1e-3


def test_quantized_prefix_length_rule():
    t = jnp.arange(40)
    got = np.asarray(faithful.quantized_prefix_length(t, 5, 8))
    want = np.array([max(0, (i - 5) // 8) * 8 for i in range(40)])
    np.testing.assert_array_equal(got, want)
    assert got[12] == 0 and got[13] == 8  # (13 - 5) // 8 = 1: page 0 leaves the tail once R tokens follow it


def test_metrics_against_numpy():
    rng = np.random.default_rng(3)
    lq = rng.normal(size=(2, 7, 11)).astype(np.float32) * 2
    lr = rng.normal(size=(2, 7, 11)).astype(np.float32) * 2
    tok = rng.integers(0, 11, size=(2, 7))

    def logsm(x):
        x = x.astype(np.float64)
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    a, r = logsm(lq)[:, :-1], logsm(lr)[:, :-1]
    nll = -np.take_along_axis(a, tok[:, 1:, None], -1)[..., 0]
    kl = np.mean(np.sum(np.exp(r) * (r - a), -1))
    top1 = np.mean(a.argmax(-1) == r.argmax(-1))
    # f32 log-softmax over 11 logits of size ~5: errors ~1e-6.
    np.testing.assert_allclose(np.asarray(faithful.token_nll(lq, tok)), nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(faithful.perplexity(lq, tok)), np.exp(nll.mean()), rtol=1e-5)
    np.testing.assert_allclose(float(faithful.kl_vs_reference(lq, lr)), kl, rtol=1e-5, atol=1e-6)
    assert float(faithful.top1_agreement(lq, lr)) == pytest.approx(top1)
    assert float(faithful.kl_vs_reference(lr, lr)) == pytest.approx(0.0, abs=1e-6)


def test_all_16_bit_equals_dense_causal_attention():
    from kvtuner_jax import model

    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(2, 23, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 23, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 23, 2, 16)), jnp.float32)
    att = faithful.FaithfulQuantAttention((_spec(16, 16, r=3),), 8)
    got, state = att(0, q, k, v, None, "s")
    want, _ = model.DenseCausalAttention()(0, q, k, v, None, None)
    assert state == "s"
    # Same float32 math up to einsum order: ~1e-6 on O(1) outputs.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_faithful_logits_on_tiny_model():
    from kvtuner_jax import model

    cfg = model.tiny_config()
    params = model.init_random_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, cfg.vocab_size)
    ref = model.logits_dense(params, cfg, tokens)
    full = faithful.faithful_logits(params, cfg, tokens, [_spec(16, 16)] * cfg.num_layers, 8)
    # 16-bit everywhere: the whole model is the dense model (float32 end to end, ~1e-5 on logits of size ~5).
    np.testing.assert_allclose(np.asarray(full), np.asarray(ref), atol=1e-4, rtol=0)
    quant = faithful.faithful_logits(params, cfg, tokens, [_spec(2, 2, r=0)] * cfg.num_layers, 8)
    assert quant.shape == ref.shape and quant.dtype == jnp.float32
    kl = float(faithful.kl_vs_reference(quant, ref))
    assert kl > 1e-4  # 2-bit pages are visible from token 8 on
    # The first page's tokens (t < 8) see no quantized token: identical logits there.
    np.testing.assert_allclose(np.asarray(quant[:, :8]), np.asarray(ref[:, :8]), atol=1e-4, rtol=0)
