"""An independent float32 numpy forward of a HF Llama/Qwen2 decoder (test helper; never imports kvtuner_jax.model).

Written from the HF `modeling_llama.py` definition: RMSNorm in float32, q/k/v projections (+ bias for Qwen2),
RoPE, repeat_kv for GQA, causal softmax attention, o_proj, SwiGLU MLP, final norm, LM head.

Weights are a dict of HF tensor names -> numpy arrays in HF orientation ([out, in]). Two RoPE conventions:
- "half": HF rotate_half, pairs (i, i + hd/2), for weights in HF row order;
- "interleaved": llama.cpp's pairs (2i, 2i + 1), for Q/K rows left in GGUF order. `gguf_weights` reads a GGUF file
  this way, without un-permuting anything, so it checks kvtuner_jax.weights' un-permutation independently (q.k
  dot products are invariant to the same reordering of head_dim in q and k; v is never permuted).
"""

from __future__ import annotations

import numpy as np


def inv_freq(hd: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """HF `_compute_default_rope_parameters` / `_compute_llama3_parameters`, in float64 then float32."""
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if scaling:
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, out)
    return inv.astype(np.float32)


def apply_rope(x: np.ndarray, pos: np.ndarray, inv: np.ndarray, style: str) -> np.ndarray:
    """x: [T, N, hd], pos: [T]."""
    ang = pos.astype(np.float32)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if style == "half":
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if style == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out
    raise ValueError(style)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + eps))


def forward(w: dict, cfg: dict, tokens: np.ndarray, rope_style: str = "half") -> np.ndarray:
    """Logits [T, V] float32 for one sequence tokens [T] at positions 0..T-1.

    cfg: HF config.json keys (hidden_size, num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers,
    rope_theta, rope_scaling, rms_norm_eps, attention_bias).
    """
    f32 = np.float32
    T = len(tokens)
    Hq, H = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // Hq
    eps = cfg["rms_norm_eps"]
    inv = inv_freq(hd, cfg["rope_theta"], cfg.get("rope_scaling"))
    pos = np.arange(T)
    x = w["model.embed_tokens.weight"][tokens].astype(f32)  # [T, D]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        proj = {}
        for n in "qkv":
            y = h @ w[p + f"self_attn.{n}_proj.weight"].T
            if p + f"self_attn.{n}_proj.bias" in w:
                y = y + w[p + f"self_attn.{n}_proj.bias"]
            proj[n] = y
        q = apply_rope(proj["q"].reshape(T, Hq, hd), pos, inv, rope_style)
        k = apply_rope(proj["k"].reshape(T, H, hd), pos, inv, rope_style)
        v = proj["v"].reshape(T, H, hd)
        k = np.repeat(k, Hq // H, axis=1)  # repeat_kv: query head j uses kv head j // (Hq // H)
        v = np.repeat(v, Hq // H, axis=1)
        s = np.einsum("tnd,snd->nts", q, k) / np.sqrt(f32(hd))
        s = np.where(causal[None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        e = np.exp(s)
        a = e / e.sum(-1, keepdims=True)
        o = np.einsum("nts,snd->tnd", a, v).reshape(T, Hq * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return (x @ head.T).astype(f32)


_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_weights(path) -> tuple[dict, dict]:
    """(HF-named float32 weights with Q/K rows in GGUF order, HF-style config) read straight from a llama GGUF.

    Use with rope_style="interleaved".
    """
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("llama.")}
    cfg = {
        "hidden_size": meta["llama.embedding_length"],
        "num_attention_heads": meta["llama.attention.head_count"],
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "num_hidden_layers": meta["llama.block_count"],
        "rope_theta": meta["llama.rope.freq_base"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_scaling": None,
    }
    w = {}
    for t in r.tensors:
        a = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape([int(n) for n in t.shape[::-1]])
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
        else:
            name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]]
            name += "." + parts[1]
        w[name] = a
    return w, cfg
