"""Hadamard rotation (manifest `rotation`): orthonormal, attention-preserving in full precision, and consistent
between the cache path and the decode-faithful pass when quantized."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtuner_jax import cache as kc
from kvtuner_jax import faithful
from kvtuner_jax.rotation import hadamard_matrix, rotate
from kvtuner_jax.specs import KVSpec, LayerSpec


@pytest.mark.parametrize("d", [64, 96, 128])
def test_hadamard_is_orthonormal_and_mixes_every_channel_of_its_block(d):
    h = hadamard_matrix(d).astype(np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-6)
    block = d & -d  # 96 -> 32: three blocks
    assert np.count_nonzero(h[0]) == block


@pytest.mark.parametrize("d", [64, 96, 128])
def test_rotation_leaves_full_precision_attention_unchanged(d):
    """16-bit K and V: rotating Q and K by the same orthonormal matrix cannot change q.k, so outputs agree to f32."""
    rng = np.random.default_rng(d)
    q = jnp.asarray(rng.normal(size=(2, 20, 4, d)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, 20, 2, d)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, 20, 2, d)).astype(np.float32))
    plain = LayerSpec(KVSpec(16), KVSpec(16))
    rot = dataclasses.replace(plain, rotation=True)
    a = faithful.FaithfulQuantAttention((plain,), 8)(0, q, k, v, None, None)[0]
    b = faithful.FaithfulQuantAttention((rot,), 8)(0, q, k, v, None, None)[0]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)  # f32 rounding of a d-term dot product
    # and the rotated keys really differ from the plain ones (the test would pass trivially otherwise)
    assert np.abs(np.asarray(rotate(k)) - np.asarray(k)).max() > 0.1


def test_rotated_quantized_cache_matches_faithful():
    """2-bit rotated keys: decode through the cache equals the faithful pass (both rotate before quantizing)."""
    d, p, t = 32, 8, 30
    spec = LayerSpec(KVSpec(2, group_size=32), KVSpec(4, group_size=32), residual_length=0, rotation=True)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, t, 2, d)).astype(np.float32)
    k = (rng.normal(size=(1, t, 1, d)) * np.r_[np.full(d - 2, 0.3), [6.0, -5.0]]).astype(np.float32)  # 2 outliers
    v = rng.normal(size=(1, t, 1, d)).astype(np.float32)
    want = np.asarray(faithful.FaithfulQuantAttention((spec,), p)(0, *map(jnp.asarray, (q, k, v)), None, None)[0])
    cfg = kc.CacheConfig(1, 1, d, p, 8, 1, dtype="float32")
    att = kc.PagedAttention(backend="reference")
    state = (kc.init_cache((spec,), cfg), None)
    step = jax.jit(lambda st, qq, kk, vv, b: att(0, qq, kk, vv, None, (st[0], b)))
    table = jnp.arange(8, dtype=jnp.int32)[None]
    for i in range(t):
        b = kc.BatchInfo(table, jnp.array([i], jnp.int32), jnp.array([1], jnp.int32), jnp.array([0], jnp.int32))
        out, state = step(state, *(jnp.asarray(x[:, i : i + 1]) for x in (q, k, v)), b)
        np.testing.assert_allclose(np.asarray(out)[0, 0], want[0, i], atol=2e-5)
