"""What the CPU measurement scripts on the embedded model share (fixed_softmax_reach.py, precision_error.py): the
walk through its layers that yields their real queries, keys and values, and the JSON report they write."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from kvtuner_jax import model

_qkv = jax.jit(model.layer_qkv, static_argnums=1)
_out = jax.jit(model.layer_out, static_argnums=1)


def layer_activations(cfg, params, window) -> Iterator[tuple[int, jax.Array, jax.Array, jax.Array]]:
    """(layer, q [1, T, Hq, hd], k [1, T, H, hd], v) of each layer for one token window (RoPE applied), the hidden
    state carried from layer to layer by dense causal attention, as the model's forward does."""
    tokens = jnp.asarray(window)[None]
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    x = model.embed_tokens(params, cfg, tokens)
    for i, lp in enumerate(params.layers):
        q, k, v = _qkv(lp, cfg, x, positions)
        yield i, q, k, v
        x = _out(lp, cfg, x, model.dense_causal_attention(q, k, v))


def write_report(path: str, rows: list, t0: float, **meta) -> None:
    """Writes {"meta": meta + date, machine, argv and seconds since t0 (perf_counter), "rows": rows} to `path`."""
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        **meta,
        "argv": sys.argv,
        "seconds": time.perf_counter() - t0,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
