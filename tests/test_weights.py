"""Loading: GGUF (real SmolLM2), HF safetensors directories, Orbax round trips, load_model dispatch and caching,
and the tokenizer built from the GGUF vocabulary."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtuner_jax import assets, model, weights
from kvtuner_jax.errors import AssetError, ModelError
from kvtuner_jax.tokenizer import SMOLLM2_SYSTEM, Tokenizer, chatml


@pytest.fixture(scope="module")
def smol():
    return weights.load_gguf()  # (cfg, params, tokenizer), float32


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


# -- GGUF ---------------------------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for n_head, hd in ((9, 64), (3, 8)):
        w = rng.standard_normal((n_head * hd, 5)).astype(np.float32)
        p = weights.permute_qk(w, n_head)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(weights.unpermute_qk(p, n_head), w)
        # llama.cpp's permutation: GGUF row (h, i, j) holds HF row (h, j, i) of the [n_head, 2, hd/2] view, so
        # GGUF rows 2i, 2i+1 of a head are HF rows i, i + hd/2 (the pairs its RoPE rotates together).
        np.testing.assert_array_equal(p[1], w[hd // 2])
        np.testing.assert_array_equal(p[hd + 2], w[hd + 1])


def test_gguf_config_of_smollm2(smol):
    cfg, params, tok = smol
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None and cfg.tie_word_embeddings and not cfg.qkv_bias
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids[0] == 2 and cfg.eos_token_ids == tok.eos_token_ids
    assert params.lm_head is None and len(params.layers) == 30
    assert params.layers[0].wq.shape == (576, 576) and params.layers[0].wk.shape == (576, 192)
    assert params.layers[0].w_down.shape == (1536, 576) and params.embed.shape == (49152, 576)
    n = sum(a.size for a in jax.tree.leaves(params))
    assert n == 134_515_008  # SmolLM2-135M's parameter count (tied head)


def test_missing_or_damaged_gguf_raises_asset_error(tmp_path):
    with pytest.raises(AssetError, match="nope.gguf"):
        weights.load_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(AssetError, match="bad.gguf"):
        weights.load_gguf(bad)
    with pytest.raises(AssetError, match="nothing"):
        weights.load_model(tmp_path / "nothing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(AssetError, match="empty_dir"):
        weights.load_model(tmp_path / "empty_dir")


def _nll(logits, tokens):
    lp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32))
    return -float(jnp.take_along_axis(lp, tokens[0, 1:, None], -1).mean())


@pytest.mark.slow
def test_perplexity_proves_qk_unpermutation(smol):
    """The un-permuted weights score a perplexity in the 20s on a 1024-token essay window (measured on the 2-core
    box: 25.68 in float32, 25.66 in bfloat16); with llama.cpp's Q/K row order put back (RoPE pairs wrong): ~350."""
    cfg, params, tok = smol
    ids = tok.encode(assets.essay_texts()[0])
    assert len(ids) >= 1024
    x = jnp.asarray([ids[:1024]], jnp.int32)
    f = jax.jit(model.logits_dense, static_argnums=1)
    ppl = float(np.exp(_nll(f(params, cfg, x), x)))
    print(f"SmolLM2 float32 perplexity, 1024 tokens of essay 0: {ppl:.2f}")
    assert 10 < ppl < 40

    def gguf_order(w, n_head):  # w: [D, n_head * hd] -> columns in llama.cpp's order
        return jnp.asarray(weights.permute_qk(np.asarray(w).T, n_head).T)

    layers = tuple(
        dataclasses.replace(lp, wq=gguf_order(lp.wq, cfg.num_heads), wk=gguf_order(lp.wk, cfg.num_kv_heads))
        for lp in params.layers
    )
    ppl_w = float(np.exp(_nll(f(dataclasses.replace(params, layers=layers), cfg, x), x)))
    print(f"... with Q/K rows in GGUF order: {ppl_w:.1f}")
    assert ppl_w > 5 * ppl


# -- tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_essays(smol):
    tok = smol[2]
    texts = assets.essay_texts()
    for text in texts[:12]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(texts[0])
    assert 0.15 < len(ids) / len(texts[0]) < 0.35  # English BPE: ~4 characters per token
    assert tok.encode("x", add_bos=True) == [tok.bos_token_id, *tok.encode("x")] and tok.encode("x")[0] != 1


def test_tokenizer_known_splits_and_specials(smol):
    tok = smol[2]
    the = tok.encode(" the")
    assert len(the) == 1 and tok.decode(the) == " the" and tok.token_to_id("Ġthe") == the[0]
    assert tok.encode("Hello world") == [tok.token_to_id("Hello"), tok.token_to_id("Ġworld")]
    # SmolLM2 splits digits one by one (tokenizer.ggml.pre = "smollm").
    assert tok.encode("2024") == [tok.token_to_id(c) for c in "2024"]
    for i, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tok.encode(s) == [i]
        assert tok.encode(f"a{s}b") == [tok.token_to_id("a"), i, tok.token_to_id("b")]
    assert tok.decode([1, 2], skip_special_tokens=True) == ""


def test_chat_template(smol):
    tok = smol[2]
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    want = (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs) == want
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == 1 and ids.count(2) == 2 and tok.decode(ids) == want
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tok.apply_chat_template(sys_msgs, add_generation_prompt=False).startswith("<|im_start|>system\nBe brief.")
    jinja2 = pytest.importorskip("jinja2")  # where installed, the fallback must equal the real template
    tmpl = jinja2.Environment().from_string(tok.chat_template)
    for m in (msgs, sys_msgs):
        assert chatml(m, True) == tmpl.render(messages=m, add_generation_prompt=True)


def test_tokenizer_json_round_trip(smol):
    tok = smol[2]
    tok2 = Tokenizer.from_json(tok.to_json())
    text = assets.essay_texts()[5][:3000] + "<|im_end|>"
    assert tok2.encode(text) == tok.encode(text)
    assert (tok2.bos_token_id, tok2.eos_token_ids, tok2.chat_template) == (
        tok.bos_token_id,
        tok.eos_token_ids,
        tok.chat_template,
    )


# -- HF directories and Orbax ----------------------------------------------------------------------------------------


def _write_hf_dir(path, cfg_dict: dict, params: model.Params):
    """Writes a HF checkpoint by hand (HF names, [out, in] weights), independently of weights.load_hf_dir."""
    from safetensors.numpy import save_file

    t = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
    if params.lm_head is not None:
        t["lm_head.weight"] = params.lm_head.T
    for i, lp in enumerate(params.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = lp.attn_norm
        t[p + "post_attention_layernorm.weight"] = lp.mlp_norm
        for n, w in (("q", lp.wq), ("k", lp.wk), ("v", lp.wv), ("o", lp.wo)):
            t[p + f"self_attn.{n}_proj.weight"] = w.T
        for n, b in (("q", lp.bq), ("k", lp.bk), ("v", lp.bv)):
            if b is not None:
                t[p + f"self_attn.{n}_proj.bias"] = b
        t[p + "mlp.gate_proj.weight"] = lp.w_gate.T
        t[p + "mlp.up_proj.weight"] = lp.w_up.T
        t[p + "mlp.down_proj.weight"] = lp.w_down.T
    t = {k: np.ascontiguousarray(np.asarray(v)) for k, v in t.items()}
    names = sorted(t)
    half = len(names) // 2  # two shards, as real checkpoints come
    save_file({k: t[k] for k in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in names[half:]}, str(path / "model-00002-of-00002.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg_dict))


QWEN_LIKE = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "_name_or_path": "tiny",
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def test_hf_dir_round_trip(tmp_path, smol):
    cfg = model.ModelConfig.from_hf_config(QWEN_LIKE, name="tiny")
    assert cfg.qkv_bias and not cfg.tie_word_embeddings and cfg.head_dim == 12 and cfg.rope_scaling.factor == 4.0
    params = model.init_random_params(cfg, jax.random.key(1))
    _write_hf_dir(tmp_path, QWEN_LIKE, params)
    (tmp_path / "tokenizer.json").write_text(smol[2].hf.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "X"}))
    cfg2, params2, tok = weights.load_model(tmp_path)
    assert cfg2 == cfg
    assert _leaves_equal(params, params2)
    assert tok.eos_token_ids[0] == 2 and tok.chat_template == "X" and tok.encode("the cat") == smol[2].encode("the cat")
    with pytest.raises(ModelError, match="lacks tensor"):
        (tmp_path / "model-00001-of-00002.safetensors").unlink()
        weights.load_hf_dir(tmp_path)


def test_orbax_round_trip_and_dtype(tmp_path, smol):
    cfg = model.tiny_config(qkv_bias=True, tie=False, rope_scaling=True)
    params = model.init_random_params(cfg, jax.random.key(2))
    out = weights.save_orbax(tmp_path / "ckpt", cfg, params, smol[2])
    assert weights.is_orbax_dir(out)
    cfg2, params2, tok2 = weights.load_model(tmp_path / "ckpt")
    assert (
        cfg2 == cfg and _leaves_equal(params, params2) and tok2.encode("hello there") == smol[2].encode("hello there")
    )
    cfg3, params3, _ = weights.load_orbax(tmp_path / "ckpt", dtype="bfloat16")
    assert cfg3.dtype == "bfloat16" and all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params3))
    # Saving again over an existing checkpoint replaces it.
    cfg_tied = model.tiny_config()
    weights.save_orbax(tmp_path / "ckpt", cfg_tied, model.init_random_params(cfg_tied, jax.random.key(3)), None)
    cfg4, params4, tok4 = weights.load_orbax(tmp_path / "ckpt")
    assert cfg4 == cfg_tied and params4.lm_head is None and tok4 is None


def test_load_model_converts_embedded_gguf_once(tmp_path, monkeypatch, smol):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    cfg, params, tok = weights.load_model(None, progress=False)
    target = weights.gguf_cache_path(assets.smollm2_gguf())
    assert target.parent == tmp_path and weights.is_orbax_dir(target)
    assert target.name == f"SmolLM2-135M-Instruct.Q4_1-{assets.smollm2_gguf().stat().st_size}"
    assert cfg == smol[0] and _leaves_equal(params, smol[1])

    def no_parse(*a, **k):
        raise AssertionError("load_model parsed the GGUF again instead of restoring the Orbax copy")

    monkeypatch.setattr(weights, "load_gguf", no_parse)
    cfg2, params2, tok2 = weights.load_model(None, dtype="bfloat16")
    assert cfg2 == dataclasses.replace(cfg, dtype="bfloat16")
    assert params2.embed.dtype == jnp.bfloat16 and jnp.array_equal(params2.embed, params.embed.astype(jnp.bfloat16))
    assert tok2.encode("the end") == tok.encode("the end")
