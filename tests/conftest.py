"""Shared test fixtures (kept small: each test file builds what only it needs)."""

from __future__ import annotations

import os
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


def shard_of(nodeids: list[str], spec: str) -> list[bool]:
    """Which of these tests belong to shard `spec` = "i/n" (1 <= i <= n): every n-th test in the order of their ids,
    starting with the i-th, so that n runs with i = 1 .. n cover each test once (a file too long for one call on a
    lent GPU, e.g. `KVTUNER_TEST_COMPILED=1 KVTUNER_TEST_SHARD=2/3 pytest tests/test_paged_attention_gpu.py`)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"KVTUNER_TEST_SHARD={spec!r}: expected 'i/n' with 1 <= i <= n") from None
    if not 1 <= i <= n:
        raise pytest.UsageError(f"KVTUNER_TEST_SHARD={spec!r}: expected 'i/n' with 1 <= i <= n")
    rank = {x: k for k, x in enumerate(sorted(nodeids))}
    return [rank[x] % n == i - 1 for x in nodeids]


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("KVTUNER_TEST_SHARD")
    if not spec:
        return
    keep = shard_of([it.nodeid for it in items], spec)
    config.hook.pytest_deselected(items=[it for it, k in zip(items, keep, strict=True) if not k])
    items[:] = [it for it, k in zip(items, keep, strict=True) if k]
