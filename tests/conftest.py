"""Shared test fixtures (kept small: each test file builds what only it needs)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from kvtuner_jax.specs import ModelIdentity

SMOLLM2 = ModelIdentity("SmolLM2-135M-Instruct", num_layers=30, num_kv_heads=3, head_dim=64)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test's id: different data per test and parameter set, same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def smollm2() -> ModelIdentity:
    """SmolLM2-135M-Instruct's KV shape: 30 layers, 3 KV heads, head_dim 64."""
    return SMOLLM2
