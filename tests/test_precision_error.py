"""benchmarks/precision_error.py: its exact attention against an independent float64 loop, its page layout against
the reference's gather, and one small run on the embedded model (errors ordered as the precisions promise)."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
from _bench import load_benchmark

from kvtuner_jax.specs import KVSpec
from pallas_kernels.paged_attention import gather_pages

pe = load_benchmark("precision_error.py")


def test_exact_attention_matches_a_loop(rng):
    b, hq, h, t, d = 2, 6, 2, 9, 8
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((t, h, d)).astype(np.float32) for _ in range(2))
    got = pe.exact_attention(q, k, v)
    for bi in range(b):
        for qh in range(hq):
            kh = qh // (hq // h)
            s = np.array([q[bi, qh].astype(np.float64) @ k[j, kh] / math.sqrt(d) for j in range(t)])
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(got[bi, qh], p @ v[:, kh].astype(np.float64), rtol=1e-12, atol=1e-12)


def test_pages_hold_the_tokens_in_order(rng):
    """16-bit pages (bf16 storage) read back through the reference's page gather give the tokens, page i = tokens
    64 i .. 64 i + 63, to bf16 rounding."""
    t, h, d = 3 * pe.PAGE, 2, 16
    x = rng.standard_normal((t, h, d)).astype(np.float32)
    pools = pe.pages_of(jnp.asarray(x), KVSpec(16))
    back = gather_pages(*pools, KVSpec(16), jnp.arange(3, dtype=jnp.int32)[None], d)  # [1, H, T, D]
    np.testing.assert_allclose(np.asarray(back[0]).transpose(1, 0, 2), x, rtol=2**-8)


def test_small_run_on_the_embedded_model(tmp_path):
    """One layer, 128 cached tokens: "high" stays near the reference (~1e-5), bf16 adds ~1e-3, both far below a
    4/2 KIVI layer's quantization error; an unquantized layer's pages are exact up to bf16 storage."""
    out = tmp_path / "pe.json"
    pe.main(["--seq_len", "128", "--queries", "2", "--layers", "3", "--pairs", "kivi4/2,16/16", "--out", str(out)])
    rows = {r["pair"]: r for r in json.loads(out.read_text())["rows"]}
    q, hi, bf = (rows["kivi4/2"]["largest"][x] for x in ("quantization", "high", "bf16"))
    assert hi < 1e-4 and 1e-5 < bf < 3e-2 and bf < 0.5 * q and q > 1e-2, rows["kivi4/2"]
    assert rows["16/16"]["largest"]["quantization"] < 1e-2
    assert rows["16/16"]["largest"]["high"] < 1e-4
