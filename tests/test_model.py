"""Decoder forward against an independent numpy implementation (real SmolLM2 weights and a tiny Qwen2-style model
with Llama-3 RoPE scaling), padded batches against solo runs, the attention protocol, and the config helpers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpy_llama
import pytest

from kvtuner_jax import assets, model, weights
from kvtuner_jax.errors import ModelError


@pytest.fixture(scope="module")
def smol():
    cfg, params, tok = weights.load_gguf()  # float32
    ids = tok.encode(assets.essay_texts()[3])
    return cfg, params, ids


@pytest.fixture(scope="module")
def smol_numpy():
    # Read straight from the GGUF, Q/K rows left in llama.cpp's order, used with llama.cpp's interleaved RoPE:
    # agreement with model.py (HF order, rotate_half) also proves weights.unpermute_qk exactly.
    return numpy_llama.gguf_weights(assets.smollm2_gguf())


_logits = jax.jit(model.logits_dense, static_argnums=1)


@pytest.mark.parametrize("T", [37, 300])
def test_smollm2_matches_numpy_forward(smol, smol_numpy, T):
    cfg, params, ids = smol
    w, hf_cfg = smol_numpy
    x = np.asarray(ids[:T])
    want = numpy_llama.forward(w, hf_cfg, x, rope_style="interleaved")  # [T, V]
    got = np.asarray(_logits(params, cfg, jnp.asarray(x[None], jnp.int32))[0])
    # Both float32 with the same weights; only summation order differs (XLA vs numpy BLAS, einsum, RoPE form).
    # Rounding of ~1e-7 relative per op, amplified through 30 residual layers, measured max |diff| ~1e-4 on logits of
    # magnitude ~40; 1e-3 leaves a 10x margin yet is 4 orders below what a wrong RoPE pairing gives (~25).
    assert np.abs(want).max() > 10
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def _hf_weights(params: model.Params) -> dict:
    """Our params back to HF names and [out, in] orientation (test-side mapping, for numpy_llama)."""
    w = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
    if params.lm_head is not None:
        w["lm_head.weight"] = params.lm_head.T
    for i, lp in enumerate(params.layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": lp.attn_norm, p + "post_attention_layernorm.weight": lp.mlp_norm}
        w |= {p + f"self_attn.{n}_proj.weight": m.T for n, m in zip("qkvo", (lp.wq, lp.wk, lp.wv, lp.wo), strict=True)}
        w |= {
            p + f"self_attn.{n}_proj.bias": b
            for n, b in zip("qkv", (lp.bq, lp.bk, lp.bv), strict=True)
            if b is not None
        }
        w |= {p + "mlp.gate_proj.weight": lp.w_gate.T, p + "mlp.up_proj.weight": lp.w_up.T}
        w[p + "mlp.down_proj.weight"] = lp.w_down.T
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def test_tiny_qwen2_llama3_rope_matches_numpy():
    """QKV bias, untied head and Llama-3 RoPE scaling, at positions past original_max_position_embeddings (64)."""
    cfg = model.tiny_config(qkv_bias=True, tie=False, rope_scaling=True)
    params = model.init_random_params(cfg, jax.random.key(0))
    T = 150
    x = np.asarray(jax.random.randint(jax.random.key(1), (T,), 0, cfg.vocab_size))
    want = numpy_llama.forward(_hf_weights(params), cfg.to_hf_config(), x, rope_style="half")
    got = np.asarray(_logits(params, cfg, jnp.asarray(x[None], jnp.int32))[0])
    # float32 vs float32, 2 layers: rounding differences stay ~1e-6 relative; logits are O(1-10).
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # The scaling matters at these positions: without it the logits move far more than the tolerance.
    plain = dataclasses.replace(cfg, rope_scaling=None)
    assert np.abs(np.asarray(_logits(params, plain, jnp.asarray(x[None], jnp.int32))[0]) - want).max() > 1e-2


def test_padded_batch_gives_solo_logits(smol):
    cfg, params, ids = smol
    lens = (37, 21)  # 37: the solo run reuses test_smollm2_matches_numpy_forward's compiled shape
    a, b = ids[100 : 100 + lens[0]], ids[500 : 500 + lens[1]]
    batch = jnp.asarray([a, b + [0] * (lens[0] - lens[1])], jnp.int32)  # right-padded with a real token id
    got = _logits(params, cfg, batch, jnp.asarray(lens, jnp.int32))
    for row, seq in enumerate((a, b)):
        solo = _logits(params, cfg, jnp.asarray([seq], jnp.int32))[0]
        # Same float32 computation except the batch's masked (exp(-inf) = 0) keys: differences are XLA's batching
        # and reduction order only.
        np.testing.assert_allclose(np.asarray(got[row, : len(seq)]), np.asarray(solo), atol=1e-4, rtol=0)
    assert np.isfinite(np.asarray(got)).all()
    # With right padding, causal masking alone already hides the pads from valid queries; so check separately that
    # `lengths` does mask: a length of 10 hides keys 10..20 from query 20 and changes its output.
    short = _logits(params, cfg, batch, jnp.asarray([10, lens[1]], jnp.int32))
    assert np.abs(np.asarray(short[0, 20]) - np.asarray(got[0, 20])).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(short[0, :10]), np.asarray(got[0, :10]))


def test_attention_protocol_and_jit():
    cfg = model.tiny_config()
    params = model.init_random_params(cfg, jax.random.key(3))
    B, T = 2, 9
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + 5, (B, T))
    seen = []

    def attn(layer, q, k, v, positions, state):
        seen.append((layer, q.shape, k.shape, v.shape))
        return model.dense_causal_attention(q, k, v), state + 1

    fwd = jax.jit(model.forward, static_argnames=("cfg", "attention"))
    logits, state = fwd(params, cfg, tokens, pos, attn, jnp.int32(0))
    hq, h, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert seen == [(i, (B, T, hq, hd), (B, T, h, hd), (B, T, h, hd)) for i in range(cfg.num_layers)]
    assert int(state) == cfg.num_layers and logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    # DenseCausalAttention() is hashable (static) and, with lengths, a pytree argument; both give the same logits
    # here (full lengths), and q/k RoPE depends only on position differences inside attention, so shifting all
    # positions by 5 changes nothing.
    l1, none = fwd(params, cfg, tokens, pos, model.DenseCausalAttention(), None)
    l2, _ = jax.jit(model.forward, static_argnames="cfg")(
        params, cfg, tokens, pos - 5, model.DenseCausalAttention(jnp.full((B,), T, jnp.int32)), None
    )
    assert none is None
    np.testing.assert_allclose(np.asarray(l1), np.asarray(logits), atol=1e-6)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=1e-4)
    with pytest.raises(ModelError, match="num_layers"):
        model.forward(params, dataclasses.replace(cfg, num_layers=3), tokens, pos, attn, 0)


def test_bfloat16_forward_close_to_float32(smol):
    cfg, params, ids = smol
    x = jnp.asarray([ids[:37]], jnp.int32)
    f32 = _logits(params, cfg, x)
    b16 = _logits(model.cast_params(params, "bfloat16"), dataclasses.replace(cfg, dtype="bfloat16"), x)
    assert b16.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits: logits move by O(0.1-1), the ranking of the top token mostly survives.
    assert (np.asarray(f32.argmax(-1)) == np.asarray(b16.argmax(-1))).mean() > 0.8
    assert 0.01 < float(jnp.abs(f32 - b16).max()) < 5


def test_configs():
    for cfg, n in ((model.llama31_8b_config(), 8_030_261_248), (model.qwen25_7b_config(), 7_615_616_512)):
        shapes = model.param_shapes(cfg)  # abstract: no memory
        assert sum(a.size for a in jax.tree.leaves(shapes)) == n  # published parameter counts
        assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(shapes))
        assert model.ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
        hash(cfg)  # usable as a static jit argument
    assert model.qwen25_7b_config().qkv_bias and model.param_shapes(model.qwen25_7b_config()).layers[0].bq.shape == (
        3584,
    )
    with pytest.raises(ModelError, match="num_heads"):
        dataclasses.replace(model.tiny_config(), num_kv_heads=3)
    with pytest.raises(ModelError, match="rope_type"):
        model.ModelConfig.from_hf_config({**model.tiny_config().to_hf_config(), "rope_scaling": {"rope_type": "yarn"}})


def test_rope_matches_rotation_formula():
    cfg = model.tiny_config(rope_scaling=True)
    x = jax.random.normal(jax.random.key(5), (1, 3, 2, cfg.head_dim))
    pos = jnp.asarray([[0, 7, 300]], jnp.int32)
    got = np.asarray(model.rope(x, pos, cfg))
    inv = numpy_llama.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.to_dict())
    want = numpy_llama.apply_rope(np.asarray(x[0]), np.asarray(pos[0]), inv, "half")
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    np.testing.assert_array_equal(got[0, 0], np.asarray(x[0, 0]))  # position 0 is the identity
    # A rotation: norms of each (i, i + hd/2) pair are preserved.
    h = cfg.head_dim // 2
    np.testing.assert_allclose(
        got[..., :h] ** 2 + got[..., h:] ** 2, np.asarray(x[..., :h] ** 2 + x[..., h:] ** 2), 1e-5
    )
