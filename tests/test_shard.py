"""KVTUNER_TEST_SHARD: splitting a test file over several runs (conftest.shard_of)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shard_of


def test_shards_cover_every_test_once(rng):
    ids = [f"tests/test_x.py::test_{k}[{rng.integers(1000)}]" for k in range(int(rng.integers(20, 60)))]
    n = 3
    masks = np.array([shard_of(ids, f"{i}/{n}") for i in range(1, n + 1)])
    assert (masks.sum(axis=0) == 1).all()  # each test in exactly one shard
    assert abs(int(masks.sum(axis=1).max()) - int(masks.sum(axis=1).min())) <= 1  # shards of equal size, +-1
    assert shard_of(ids, "1/1") == [True] * len(ids)
    # The order the tests were collected in does not matter: the shards follow the ids.
    order = rng.permutation(len(ids))
    assert shard_of([ids[k] for k in order], "2/3") == [bool(masks[1][k]) for k in order]


@pytest.mark.parametrize("spec", ["0/3", "4/3", "2", "a/b", "1/0"])
def test_bad_shard_spec_names_the_variable(spec):
    with pytest.raises(pytest.UsageError, match="KVTUNER_TEST_SHARD"):
        shard_of(["a", "b"], spec)
