"""Decoder + paged cache: cached logits against uncached ones (16-bit) and against the decode-faithful pass (quantized).

Why these oracles: with every layer at 16 bits the cache must be invisible, so any split of the text into prefill
chunks and decode steps gives the dense forward's logits. With quantized layers, a decode step sees exactly DESIGN.md's
decode semantics, which `faithful.faithful_logits` computes in one parallel pass by a different route (both K/V
versions for all tokens, selected by a mask). And the cache state after a prefill does not depend on how the prefill
was chunked (every token is quantized once, from full precision, when its page leaves the window), so decode logits
after any prefill split must equal the faithful ones too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtuner_jax import cache as kc
from kvtuner_jax import faithful, model
from kvtuner_jax.page_table import PageAllocator, SequencePages
from kvtuner_jax.runtime import ModelRunner, make_batch
from kvtuner_jax.specs import KVSpec, LayerSpec

PAGE = 8
CFG = dataclasses.replace(model.tiny_config(), num_layers=3)
PARAMS = model.init_random_params(CFG, jax.random.key(0))
F16 = LayerSpec(KVSpec(16), KVSpec(16))
MIXED = (
    LayerSpec(KVSpec(4, axis="channel", group_size=8), KVSpec(2, group_size=16), residual_length=4),
    LayerSpec(KVSpec(8, symmetric=True, group_size=16), KVSpec(16), residual_length=0),
    LayerSpec(KVSpec(2, group_size=8), KVSpec(4, axis="channel", group_size=8), residual_length=8),
)
# f32 everywhere; the two routes sum in different orders over <= 64 keys and 3 layers: 1e-4 absolute on logits of
# magnitude ~1 is far below any quantization effect (2-bit keys move logits by ~1e-1 here).
ATOL = 1e-4


def runner_for(specs, max_seqs=2):
    cc = kc.CacheConfig(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, PAGE, 24, max_seqs, dtype="float32")
    return ModelRunner(CFG, PARAMS, tuple(specs), cc, backend="reference")


def run_schedule(runner, rows, schedule, max_pages=8):
    """rows: token lists; schedule: list of per-row chunk sizes. Returns per-row logits [len, V] of every token fed."""
    cache = runner.init_cache()
    alloc = PageAllocator(runner.cache_cfg.num_pages)
    seqs = [SequencePages(slot=i) for i in range(len(rows))]
    out = [[] for _ in rows]
    for step in schedule:
        t = max(max(step), 1)
        toks = np.zeros((len(rows), t), np.int32)
        for i, (s, n) in enumerate(zip(seqs, step, strict=True)):
            toks[i, :n] = rows[i][s.length : s.length + n]
            s.pages += alloc.allocate(runner.pages_for(s.length + n) - len(s.pages))
        logits, cache = runner.step(cache, toks, make_batch(seqs, step, max_pages), all_logits=True)
        logits = np.asarray(logits)
        for i, (s, n) in enumerate(zip(seqs, step, strict=True)):
            out[i].append(logits[i, :n])
            s.length += n
    return [np.concatenate(o) for o in out]


@pytest.fixture(scope="module")
def text():
    return np.asarray(jax.random.randint(jax.random.key(1), (2, 40), 3, CFG.vocab_size))


def test_16bit_cache_is_invisible(text):
    dense = np.asarray(model.logits_dense(PARAMS, CFG, jnp.asarray(text)))
    r = runner_for([F16] * 3)
    one_shot = run_schedule(r, list(text), [[40, 40]])
    split = run_schedule(r, list(text), [[33, 33]] + [[1, 1]] * 7)
    chunked = run_schedule(r, list(text), [[7, 7]] * 5 + [[5, 5]])
    ragged = run_schedule(r, [text[0], text[1][:23]], [[17, 9], [23, 14], [0, 0]])
    for got in (one_shot, split, chunked):
        for i in range(2):
            np.testing.assert_allclose(got[i], dense[i], atol=ATOL)
    np.testing.assert_allclose(ragged[0], dense[0], atol=ATOL)
    dense_short = np.asarray(model.logits_dense(PARAMS, CFG, jnp.asarray(text[1:, :23])))[0]
    np.testing.assert_allclose(ragged[1], dense_short, atol=ATOL)


def test_quantized_decode_matches_faithful_pass(text):
    """Decode steps see exactly the decode-faithful pass; a long prefill is a bounded approximation of it."""
    want = np.asarray(faithful.faithful_logits(PARAMS, CFG, jnp.asarray(text), MIXED, PAGE))
    r = runner_for(MIXED)
    dense = np.asarray(model.logits_dense(PARAMS, CFG, jnp.asarray(text)))
    assert np.abs(want - dense).max() > 100 * ATOL  # the quantization is visible, so agreement below means something
    # Prefills of <= 8 tokens (the smallest R + P over layers) see no quantized page, exactly as decode would, so
    # everything after them must match the faithful pass to float error.
    for prefill, chunk in ((1, 1), (8, 3)):
        steps = [[chunk, chunk]] * (prefill // chunk) + ([[prefill % chunk] * 2] if prefill % chunk else [])
        got = run_schedule(r, list(text), steps + [[1, 1]] * (40 - prefill))
        for i in range(2):
            np.testing.assert_allclose(got[i], want[i], atol=ATOL)
    # A longer prefill chunk lets its queries see their chunk-mates in full precision (DESIGN.md: chunked prefill is
    # an approximation; the eval job uses the faithful pass). Its K/V then differ from decode's from layer 1 on, so
    # later logits differ too, but never by more than quantizing does at all: bounded by |dense - faithful|, and the
    # argmax mostly agrees.
    for prefill, chunk in ((25, 25), (25, 6)):
        steps = [[chunk, chunk]] * (prefill // chunk) + ([[prefill % chunk] * 2] if prefill % chunk else [])
        got = np.stack(run_schedule(r, list(text), steps + [[1, 1]] * (40 - prefill)))
        # the largest difference lies inside the prefill, where these queries compute what the dense model does: the
        # two sides are then the same number up to float error (ATOL), in either order (2026-12-07, an AMD host:
        # 4.3558307 against 4.355827)
        assert np.abs(got - want).max() <= np.abs(dense - want).max() + ATOL
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


def test_batch_rows_are_independent(text):
    """A sequence's logits do not depend on what else is in the batch (different lengths, staggered arrival)."""
    r = runner_for(MIXED)
    alone = run_schedule(runner_for(MIXED, 1), [text[1]], [[11]] + [[1]] * 29)
    together = run_schedule(r, [text[0], text[1]], [[19, 0], [1, 11]] + [[1, 1]] * 20 + [[0, 1]] * 9)
    np.testing.assert_allclose(together[1], alone[0], atol=ATOL)
