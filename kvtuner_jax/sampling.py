"""Token sampling: greedy, temperature, top-k, top-p, with per-row parameters (jit-friendly, no recompiles)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def sample(
    logits: jnp.ndarray, keys: jnp.ndarray, temperature: jnp.ndarray, top_k: jnp.ndarray, top_p: jnp.ndarray
) -> jnp.ndarray:
    """logits [B, V] f32; keys [B] PRNG keys; temperature/top_p [B] f32; top_k [B] int32 -> tokens [B] int32."""
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    x = logits.astype(jnp.float32) / t
    order = jnp.argsort(-x, axis=-1)
    xs = jnp.take_along_axis(x, order, axis=-1)  # descending
    rank = jnp.arange(v)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (before < top_p[:, None])
    xs = jnp.where(keep, xs, -jnp.inf)
    pick = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, xs)
    sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
