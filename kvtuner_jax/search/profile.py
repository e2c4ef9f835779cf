"""Step 1 of the search: per-layer sensitivity of every (K bits, V bits) pair, and the evaluator of whole manifests.

Profile: for layer l and pair c, quantize only layer l's cache (decode-faithful, kvtuner_jax.faithful) and measure the
mean KL(p_16bit || p_quantized) of next-token distributions on calibration windows. Everything before layer l's
attention is identical to the 16-bit run, so the 16-bit pass caches the hidden state entering each layer once, each
layer's q/k/v are computed once and shared by all its candidates, and only the attention of layer l plus the suffix
l+1..L-1 (one compiled `fori_loop` over stacked layer weights, whatever l is) run per candidate, `batch` candidates at
a time (stacked along the batch axis).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import model
from kvtuner_jax.errors import AssetError
from kvtuner_jax.faithful import faithful_attention
from kvtuner_jax.rotation import maybe_rotate
from kvtuner_jax.search.space import PAIRS, Scheme
from kvtuner_jax.specs import KVSpec, LayerSpec

DENSE = LayerSpec(k=KVSpec(bits=16), v=KVSpec(bits=16))

# ---------------------------------------------------------------------------------------------------------------------
# Calibration data


def split_halves(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Deterministic split by file index: (even-indexed, odd-indexed) essays (files are sorted by name)."""
    return list(texts[0::2]), list(texts[1::2])


def make_windows(tokenizer, texts: Sequence[str], seq_len: int, num_windows: int) -> np.ndarray:
    """[num_windows, seq_len] int32 token windows: each text is cut into whole non-overlapping windows, and
    `num_windows` of all those are taken evenly spaced (so they come from many texts), in a fixed order."""
    chunks = []
    for text in texts:
        ids = tokenizer.encode(text)
        chunks += [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if len(chunks) < num_windows:
        raise AssetError(f"the texts give only {len(chunks)} windows of {seq_len} tokens, {num_windows} were asked for")
    idx = [i * len(chunks) // num_windows for i in range(num_windows)]
    return np.asarray([chunks[i] for i in idx], np.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Jitted pieces (compiled once per shape; `spec` and `page_size` are static, so one compile per distinct pair)


def _positions(tokens_or_x) -> jnp.ndarray:
    b, t = tokens_or_x.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embed(params, tokens, *, cfg):
    return model.embed_tokens(params, cfg, tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _qkv(lp, x, *, cfg):
    return model.layer_qkv(lp, cfg, x, _positions(x))


@functools.partial(jax.jit, static_argnames=("spec", "page_size"))
def _attend(q, k, v, *, spec: LayerSpec, page_size: int):
    if not (spec.k.quantized or spec.v.quantized):
        return model.dense_causal_attention(q, k, v)
    q, k = maybe_rotate(spec, q, k)  # as FaithfulQuantAttention and the cache do
    return faithful_attention(q, k, v, spec, page_size)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _out(lp, x, attn, *, cfg):
    return model.layer_out(lp, cfg, x, attn)


def _dense_layer(lp, x, cfg):
    q, k, v = model.layer_qkv(lp, cfg, x, _positions(x))
    return model.layer_out(lp, cfg, x, model.dense_causal_attention(q, k, v))


def _scores(params, cfg, x, tokens, ref_logp):
    """Per-row metrics of final hidden states x [C*B, T, D] against the reference log-probs [B, T-1, V]."""
    logits = model.unembed(params, cfg, x)[:, :-1]  # [C*B, T-1, V]
    b = ref_logp.shape[0]
    lq = jax.nn.log_softmax(logits, axis=-1).reshape(-1, b, *logits.shape[1:])  # [C, B, T-1, V]
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - lq), axis=-1)  # [C, B, T-1]
    nll = -jnp.take_along_axis(lq, tokens[None, :, 1:, None], axis=-1)[..., 0]
    top1 = (jnp.argmax(lq, -1) == jnp.argmax(ref_logp, -1)).astype(jnp.float32)
    return {"kl": kl.mean((1, 2)), "nll": nll.mean((1, 2)), "top1": top1.mean((1, 2))}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _suffix_scores(params, stacked, start, x, tokens, ref_logp, *, cfg):
    """Dense layers start..L-1 (dynamic start: one compile serves every layer), then metrics."""

    def body(i, h):
        lp = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)
        return _dense_layer(lp, h, cfg)

    x = jax.lax.fori_loop(start, cfg.num_layers, body, x)
    return _scores(params, cfg, x, tokens, ref_logp)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _final_scores(params, x, tokens, ref_logp, *, cfg):
    return _scores(params, cfg, x, tokens, ref_logp)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _reference_logp(params, x, *, cfg):
    return jax.nn.log_softmax(model.unembed(params, cfg, x)[:, :-1], axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Reference (16-bit) pass and evaluator


@dataclasses.dataclass
class Calibration:
    """The 16-bit run on some windows, kept for reuse: hidden state entering each layer, and reference log-probs."""

    params: model.Params
    cfg: model.ModelConfig
    tokens: jnp.ndarray  # [B, T] int32
    hidden: list[jnp.ndarray]  # L + 1 x [B, T, D]: input of layer l in the 16-bit run (last: the final state)
    ref_logp: jnp.ndarray  # [B, T-1, V] float32
    stacked: model.LayerParams  # layer weights stacked along a leading [L] axis (for the suffix loop)

    @classmethod
    def build(cls, params, cfg, tokens) -> Calibration:
        tokens = jnp.asarray(tokens, jnp.int32)
        x = _embed(params, tokens, cfg=cfg)
        hidden = []
        for lp in params.layers:
            hidden.append(x)
            q, k, v = _qkv(lp, x, cfg=cfg)
            x = _out(lp, x, _attend(q, k, v, spec=DENSE, page_size=1), cfg=cfg)
        hidden.append(x)
        ref = _reference_logp(params, x, cfg=cfg)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *params.layers)
        return cls(params, cfg, tokens, hidden, ref, stacked)

    def evaluate(self, specs: Sequence[LayerSpec], page_size: int) -> dict[str, float]:
        """Mean KL vs 16-bit (nats), mean NLL (nats) and top-1 agreement of a whole per-layer spec list, decode-
        faithful. Layers before the first quantized one are taken from the cached 16-bit hidden states."""
        cfg = self.cfg
        if len(specs) != cfg.num_layers:
            raise ValueError(f"{len(specs)} layer specs for a model of {cfg.num_layers} layers")
        quantized = [i for i, s in enumerate(specs) if s.k.quantized or s.v.quantized]
        start = quantized[0] if quantized else cfg.num_layers
        x = self.hidden[start]
        for i in range(start, cfg.num_layers):
            lp = self.params.layers[i]
            q, k, v = _qkv(lp, x, cfg=cfg)
            x = _out(lp, x, _attend(q, k, v, spec=specs[i], page_size=page_size), cfg=cfg)
        out = _final_scores(self.params, x, self.tokens, self.ref_logp, cfg=cfg)
        return {k: float(v[0]) for k, v in out.items()}


@dataclasses.dataclass
class Profile:
    """losses[l, c]: mean KL (nats) when only layer l is quantized with pairs[c]; 0 for 16/16."""

    pairs: list[tuple[int, int]]
    losses: np.ndarray  # [L, C]
    nll: np.ndarray  # [L, C]
    top1: np.ndarray  # [L, C]
    seconds: float

    def to_json(self) -> dict:
        return {
            "pairs": [list(p) for p in self.pairs],
            "kl": self.losses.tolist(),
            "nll": self.nll.tolist(),
            "top1": self.top1.tolist(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        return cls(
            [tuple(p) for p in d["pairs"]],
            np.asarray(d["kl"], np.float64),
            np.asarray(d["nll"], np.float64),
            np.asarray(d["top1"], np.float64),
            float(d.get("seconds", 0.0)),
        )

    def to_csv(self) -> str:
        rows = ["layer,k_bits,v_bits,kl,nll,top1"]
        for l in range(self.losses.shape[0]):
            for c, (kb, vb) in enumerate(self.pairs):
                rows.append(f"{l},{kb},{vb},{self.losses[l, c]:.6g},{self.nll[l, c]:.6g},{self.top1[l, c]:.6g}")
        return "\n".join(rows) + "\n"


def profile_layers(
    calib: Calibration,
    scheme: Scheme,
    pairs: Sequence[tuple[int, int]] = PAIRS,
    batch: int = 1,
    layers: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
) -> Profile:
    """Sensitivity of every layer to every pair, as mean KL vs the 16-bit model (see the module docstring).

    batch: candidates run together (stacked along the batch axis) through one suffix call.
    """
    cfg = calib.cfg
    t0 = time.perf_counter()
    n_l, pairs = cfg.num_layers, [tuple(p) for p in pairs]
    shape = (n_l, len(pairs))
    kl, nll, top1 = np.zeros(shape), np.zeros(shape), np.ones(shape)
    base = calib.evaluate([DENSE] * n_l, scheme.page_size)
    nll[:] = base["nll"]
    todo = [c for c, p in enumerate(pairs) if p != (16, 16)]
    for l in layers if layers is not None else range(n_l):
        lp, x = calib.params.layers[l], calib.hidden[l]
        q, k, v = _qkv(lp, x, cfg=cfg)  # shared by all candidates of this layer
        for s in range(0, len(todo), batch):
            cs = todo[s : s + batch]
            attn = [_attend(q, k, v, spec=scheme.layer_spec(*pairs[c]), page_size=scheme.page_size) for c in cs]
            xs = jnp.concatenate([x] * len(cs)) if len(cs) > 1 else x
            h = _out(lp, xs, jnp.concatenate(attn) if len(cs) > 1 else attn[0], cfg=cfg)
            out = _suffix_scores(calib.params, calib.stacked, l + 1, h, calib.tokens, calib.ref_logp, cfg=cfg)
            for j, c in enumerate(cs):
                kl[l, c], nll[l, c], top1[l, c] = (float(out[m][j]) for m in ("kl", "nll", "top1"))
        if log:
            worst = int(np.argmax(kl[l]))
            log(f"layer {l}: max KL {kl[l, worst]:.4g} at {pairs[worst]} ({time.perf_counter() - t0:.0f} s)")
    return Profile(pairs, kl, nll, top1, time.perf_counter() - t0)
