"""Llama/Qwen2-style decoder: config, parameter pytrees, RoPE and a functional forward pass.

Choice of framework: plain functions over registered frozen-dataclass pytrees, in the style of jax-llm-examples,
without Flax modules. The KV cache is the only state, it is owned by the `attention` object handed to `forward`,
and it differs per layer (each layer's bit width gives its pool different shapes), so a module system would only add
a second place where state could hide. Flax is not needed for anything here; params are already a pytree that
Orbax, jit and sharding all accept.

The attention protocol, which the paged mixed-precision cache and the decode-faithful evaluator implement:

    attention(layer: int, q [B, T, Hq, hd], k [B, T, H, hd], v [B, T, H, hd], positions [B, T], state)
        -> (out [B, T, Hq, hd], new_state)

q and k arrive already rotated (RoPE, HF rotate_half convention). `state` is any pytree the attention object owns
(None for `DenseCausalAttention`). The attention object must be static under jit (hashable) or itself a pytree passed
as a traced argument; `DenseCausalAttention` is a pytree whose only data field is the optional `lengths`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kvtuner_jax.errors import ModelError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (HF `rope_scaling` with rope_type "llama3").

    Kept as a frozen dataclass rather than a dict so that `ModelConfig` stays hashable (a static jit argument).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def from_dict(cls, d: dict | None) -> RopeScaling | None:
        if d is None:
            return None
        kind = d.get("rope_type", d.get("type", "llama3"))
        if kind == "default":
            return None
        if kind != "llama3":
            raise ModelError(f"rope_scaling.rope_type={kind!r} is not supported (expected 'llama3' or none)")
        try:
            return cls(
                factor=float(d["factor"]),
                low_freq_factor=float(d["low_freq_factor"]),
                high_freq_factor=float(d["high_freq_factor"]),
                original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ModelError(f"rope_scaling is missing key {e.args[0]!r}: {d}") from e

    def to_dict(self) -> dict:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder. Hashable, so it can be a static jit argument.

    dtype: name of the params/activations dtype ("float32", "bfloat16", "float16"). Logits are always float32.
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # accept the HF dict form; store the hashable form
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        try:
            jnp.dtype(self.dtype)
        except TypeError as e:
            raise ModelError(f"dtype={self.dtype!r} is not a JAX dtype name") from e

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, hf: dict, name: str | None = None, dtype: str | None = None) -> ModelConfig:
        """From a HF `config.json` dict (LlamaForCausalLM or Qwen2ForCausalLM)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        if model_type not in ("llama", "qwen2", "mistral") and not any(
            a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM") for a in archs
        ):
            raise ModelError(f"config.json model_type={model_type!r} architectures={archs}: expected llama or qwen2")
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            eos = hf.get("eos_token_id")
            eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
            return cls(
                name=name or hf.get("_name_or_path") or model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rope_scaling=RopeScaling.from_dict(hf.get("rope_scaling")),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos,
                dtype=dtype or _hf_dtype(hf.get("torch_dtype", "float32")),
            )
        except KeyError as e:
            raise ModelError(f"config.json is missing key {e.args[0]!r}") from e

    def to_hf_config(self) -> dict:
        """Inverse of `from_hf_config` (used to write test checkpoints and Orbax metadata)."""
        return {
            "architectures": ["Qwen2ForCausalLM" if self.qkv_bias else "LlamaForCausalLM"],
            "model_type": "qwen2" if self.qkv_bias else "llama",
            "_name_or_path": self.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_dict(),
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "torch_dtype": self.dtype,
        }


def _hf_dtype(name: str) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(str(name), "float32")


def llama31_8b_config(dtype: str = "bfloat16") -> ModelConfig:
    """Llama-3.1-8B shapes (for random-weight benchmarks)."""
    return ModelConfig(
        name="llama-3.1-8b",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        dtype=dtype,
    )


def qwen25_7b_config(dtype: str = "bfloat16") -> ModelConfig:
    """Qwen2.5-7B shapes (QKV bias, untied head)."""
    return ModelConfig(
        name="qwen2.5-7b",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_ids=(151645, 151643),
        dtype=dtype,
    )


def tiny_config(
    dtype: str = "float32", qkv_bias: bool = False, tie: bool = True, rope_scaling: bool = False
) -> ModelConfig:
    """A small model for tests: 2 layers, GQA 4:2, head_dim 16."""
    return ModelConfig(
        name="tiny",
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rope_scaling=RopeScaling(4.0, 1.0, 4.0, 64) if rope_scaling else None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        qkv_bias=qkv_bias,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_ids=(2,),
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Parameters


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """One decoder layer, weights in `x @ w` orientation (HF weight transposed); Q/K columns in HF head order."""

    attn_norm: jax.Array  # [D]
    wq: jax.Array  # [D, Hq * hd]
    wk: jax.Array  # [D, H * hd]
    wv: jax.Array  # [D, H * hd]
    wo: jax.Array  # [Hq * hd, D]
    mlp_norm: jax.Array  # [D]
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]
    bq: jax.Array | None = None  # [Hq * hd] (Qwen2)
    bk: jax.Array | None = None  # [H * hd]
    bv: jax.Array | None = None  # [H * hd]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to embed


def param_shapes(cfg: ModelConfig) -> Params:
    """The abstract params tree (jax.ShapeDtypeStruct leaves) for `cfg`: the one description of every weight."""
    return jax.eval_shape(lambda: init_random_params(cfg, jax.random.key(0)))


def init_random_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random weights of the right shapes (tests, 8B-shaped speed runs), made on the default device in one jit.

    Matrices ~ N(0, 1/fan_in) so activations keep unit scale through depth; norms 1 + N(0, 0.1^2) so they are not
    trivially the identity; biases N(0, 0.1^2).
    """
    k_embed, k_head, k_norm, *k_layers = jax.random.split(key, 3 + cfg.num_layers)
    # Every layer has the same shapes: one compiled layer initialiser, called per layer.
    return Params(
        embed=_init_embed(cfg, k_embed),
        layers=tuple(_init_layer(cfg, k) for k in k_layers),
        final_norm=_init_vec(cfg, k_norm, cfg.hidden_size, 1.0),
        lm_head=None if cfg.tie_word_embeddings else _init_mat(cfg, k_head, (cfg.hidden_size, cfg.vocab_size)),
    )


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_mat(cfg: ModelConfig, key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[0])).astype(cfg.jnp_dtype)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_vec(cfg: ModelConfig, key: jax.Array, n: int, center: float) -> jax.Array:
    return (center + 0.1 * jax.random.normal(key, (n,), jnp.float32)).astype(cfg.jnp_dtype)


@functools.partial(jax.jit, static_argnums=0)
def _init_embed(cfg: ModelConfig, key: jax.Array) -> jax.Array:
    return jax.random.normal(key, (cfg.vocab_size, cfg.hidden_size), jnp.float32).astype(cfg.jnp_dtype)


@functools.partial(jax.jit, static_argnums=0)
def _init_layer(cfg: ModelConfig, key: jax.Array) -> LayerParams:
    D, F = cfg.hidden_size, cfg.intermediate_size
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    # (name, shape, kind): kind "mat" ~ N(0, 1/fan_in), "norm" ~ 1 + N(0, 0.01), "bias" ~ N(0, 0.01).
    fields = [("attn_norm", (D,), "norm"), ("wq", (D, nq), "mat"), ("wk", (D, nkv), "mat"), ("wv", (D, nkv), "mat")]
    fields += [("wo", (nq, D), "mat"), ("mlp_norm", (D,), "norm"), ("w_gate", (D, F), "mat"), ("w_up", (D, F), "mat")]
    fields += [("w_down", (F, D), "mat")]
    if cfg.qkv_bias:
        fields += [("bq", (nq,), "bias"), ("bk", (nkv,), "bias"), ("bv", (nkv,), "bias")]
    # One random draw sliced into all weights: CPU compile time grows with the number of RNG ops, not their size.
    z = jax.random.normal(key, (sum(math.prod(s) for _, s, _ in fields),), jnp.float32)
    out, off = {}, 0
    for name, shape, kind in fields:
        n = math.prod(shape)
        x = z[off : off + n].reshape(shape)
        off += n
        x = x / math.sqrt(shape[0]) if kind == "mat" else 0.1 * x + (1.0 if kind == "norm" else 0.0)
        out[name] = x.astype(cfg.jnp_dtype)
    return LayerParams(**out)


def cast_params(params: Params, dtype: str | jnp.dtype) -> Params:
    return jax.tree.map(lambda a: a.astype(dtype), params)


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the forward pass


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [hd / 2] (float32), with Llama-3 scaling applied when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wl, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return jnp.where(medium, smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding, HF rotate_half convention (pairs are (i, i + hd/2)), computed in float32.

    x: [B, T, N, hd]; positions: [B, T] int. Returns x's dtype.
    """
    inv = rope_inv_freq(cfg)  # [hd/2]
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, hd/2]
    cos = jnp.cos(ang)[:, :, None, :]  # [B, T, 1, hd/2]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def layer_qkv(
    lp: LayerParams, cfg: ModelConfig, x: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-attention half of a layer: norm, projections, RoPE.

    x: [B, T, D] -> q [B, T, Hq, hd], k [B, T, H, hd], v [B, T, H, hd] (q, k rotated).
    """
    B, T, _ = x.shape
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q, k, v = h @ lp.wq, h @ lp.wk, h @ lp.wv
    if lp.bq is not None:
        q, k, v = q + lp.bq, k + lp.bk, v + lp.bv
    q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    return rope(q, positions, cfg), rope(k, positions, cfg), v


def layer_out(lp: LayerParams, cfg: ModelConfig, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Post-attention half: output projection + residual, then the SwiGLU MLP + residual.

    x: [B, T, D] (the layer's input), attn: [B, T, Hq, hd] -> [B, T, D].
    """
    B, T, _ = x.shape
    x = x + attn.reshape(B, T, -1).astype(x.dtype) @ lp.wo
    h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
    return x + (jax.nn.silu(h @ lp.w_gate) * (h @ lp.w_up)) @ lp.w_down


def embed_tokens(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    return jnp.take(params.embed, tokens, axis=0).astype(cfg.jnp_dtype)  # [B, T, D]


def unembed(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and LM head. x: [B, T, D] -> logits [B, T, V] float32 (accumulated in float32)."""
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    if params.lm_head is None:
        return jnp.einsum("BTD,VD->BTV", h, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", h, params.lm_head, preferred_element_type=jnp.float32)


Attention = Callable[[int, jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    attention: Attention,
    state: Any = None,
) -> tuple[jax.Array, Any]:
    """Decoder forward pass.

    tokens, positions: [B, T] int32. attention: see the module docstring; state: the pytree it owns.
    Returns (logits [B, T, V] float32, new state).
    """
    if len(params.layers) != cfg.num_layers:
        raise ModelError(f"params have {len(params.layers)} layers, config says num_layers={cfg.num_layers}")
    x = embed_tokens(params, cfg, tokens)
    # A Python loop (unrolled under jit), not lax.scan: layers of different bit widths have cache pools of different
    # shapes, so their attention calls differ per layer and cannot share one scanned body.
    for i, lp in enumerate(params.layers):
        q, k, v = layer_qkv(lp, cfg, x, positions)
        attn, state = attention(i, q, k, v, positions, state)
        x = layer_out(lp, cfg, x, attn)
    return unembed(params, cfg, x), state


# ---------------------------------------------------------------------------------------------------------------------
# Dense attention (no cache)


def dense_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, mask: jax.Array | None = None
) -> jax.Array:
    """Causal GQA softmax attention over the T tokens given, in float32.

    q: [B, T, Hq, hd], k, v: [B, S, H, hd] with S == T (token t sees j <= t), lengths: [B] valid tokens per row
    (keys at j >= lengths[b] are masked; rows past their length produce finite but meaningless outputs).
    mask: optional extra [B, T, S] bool (True = may attend), and-ed in. Returns [B, T, Hq, hd] in q's dtype.
    """
    B, T, Hq, hd = q.shape
    S, H = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, H, Hq // H, hd)  # [B, T, H, G, hd]; query head h*G+g uses kv head h
    s = jnp.einsum("BTHGK,BSHK->BHGTS", qg, k.astype(jnp.float32)) / math.sqrt(hd)
    allowed = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]  # [T, S]
    allowed = jnp.broadcast_to(allowed, (B, T, S))
    if lengths is not None:
        allowed = allowed & (jnp.arange(S)[None, None, :] < lengths[:, None, None])
    if mask is not None:
        allowed = allowed & mask
    s = jnp.where(allowed[:, None, None], s, -jnp.inf)
    # A row with nothing allowed (only possible for padded rows) gets uniform zeros instead of NaN.
    s = jnp.where(jnp.any(allowed, axis=-1)[:, None, None, :, None], s, 0.0)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BHGTS,BSHK->BTHGK", p, v.astype(jnp.float32))
    return o.reshape(B, T, Hq, hd).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCausalAttention:
    """Attention object for `forward` with no cache: plain causal attention over the tokens of this call.

    lengths: optional [B] int32 valid lengths for right-padded batches. The object is a pytree (lengths is its one
    data field), so pass it to jitted functions as an argument, or close over it; with lengths=None it is also
    hashable and can be a static argument. The state is passed through unchanged.
    """

    lengths: jax.Array | None = None

    def __call__(self, layer, q, k, v, positions, state):
        return dense_causal_attention(q, k, v, self.lengths), state


def logits_dense(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] for whole right-padded sequences (positions 0..T-1), dense attention. Jit-friendly."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, _ = forward(params, cfg, tokens, positions, DenseCausalAttention(lengths), None)
    return logits
