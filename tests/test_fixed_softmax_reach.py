"""benchmarks/fixed_softmax_reach.py's measurement (how far real scores rise above the fixed softmax's reference)
against float64 numpy loops over splits and blocks, on random queries and keys."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from _bench import load_benchmark

reach = load_benchmark("fixed_softmax_reach.py")


def test_scores_and_split_excess_match_loops(rng):
    t_len, hq, h, hd = 45, 6, 2, 8
    q = rng.standard_normal((t_len, hq, hd)).astype(np.float32) * 2
    k = rng.standard_normal((t_len, h, hd)).astype(np.float32) * 2
    pos = np.array([0, 3, 9, 10, 31, 44])
    split_len, block = 10, 4
    s = np.asarray(reach.scores_base2(jnp.asarray(q), jnp.asarray(k), pos))
    ex, present = (np.asarray(x) for x in reach.split_excess(jnp.asarray(s), pos, split_len, block))
    g = hq // h
    n_splits = math.ceil(t_len / split_len)
    assert ex.shape == (h, g, len(pos), n_splits) and present.shape == (len(pos), n_splits)
    for pi, t in enumerate(pos):
        for kh in range(h):
            for gi in range(g):
                qv = q[t, kh * g + gi].astype(np.float64)
                ref = [qv @ k[j, kh].astype(np.float64) / math.sqrt(hd) * math.log2(math.e) for j in range(t + 1)]
                np.testing.assert_allclose(s[kh, gi, pi, : t + 1], ref, rtol=1e-5, atol=1e-5)
                assert np.all(np.isneginf(s[kh, gi, pi, t + 1 :]))
                for si in range(n_splits):
                    lo = si * split_len
                    assert present[pi, si] == (lo <= t)
                    if lo > t:
                        assert ex[kh, gi, pi, si] == 0.0
                        continue
                    whole = max(ref[lo : min(t + 1, lo + split_len)])
                    first = max(ref[lo : min(t + 1, lo + block)])
                    np.testing.assert_allclose(ex[kh, gi, pi, si], whole - first, rtol=1e-5, atol=1e-5)
    assert np.any(ex > 0.5)  # the random case does rise above its first blocks somewhere
