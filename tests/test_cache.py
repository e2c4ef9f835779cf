"""The paged cache against an independent simulation of DESIGN.md's residual-window semantics.

The simulation keeps each sequence's full-precision K/V history in numpy and, for a query at position t that was
processed in a step starting at length L, builds the keys it must see: tokens j < Q(L) quantized (a whole page at a
time, from the full-precision history, with the quant.py oracle) and every other token j <= t in full precision. It
then attends in float64. The cache instead keeps tails, flushes pages through the packed write and merges two partial
softmaxes, so agreement tests the bookkeeping (tails, page table, flush timing, masking) end to end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtuner_jax import cache as kc
from kvtuner_jax import quant
from kvtuner_jax.page_table import INVALID_PAGE, PageAllocator, SequencePages, pages_needed, table_rows
from kvtuner_jax.specs import KVSpec, LayerSpec

H, HQ, D, P = 2, 4, 32, 16


def fake_quant_pages(x: np.ndarray, spec: KVSpec, upto: int) -> np.ndarray:
    """x [H, L, D] float -> quantize/dequantize of tokens [0, upto) page by page (upto a multiple of P)."""
    if not spec.quantized:
        return x.copy()
    out = x.copy()
    for s in range(0, upto, P):
        page = jnp.asarray(x[:, s : s + P])
        out[:, s : s + P] = np.asarray(
            quant.fake_quantize(page, spec.bits, spec.group_size, spec.axis, spec.symmetric, jnp.float16)
        )
    return out


def expected_outputs(q, hist_k, hist_v, start_len, n, spec: LayerSpec):
    """q [T, HQ, D] of one sequence's step; hist_* [H, L_total, D] full precision -> [n, HQ, D] float64."""
    r = spec.residual_length
    nq = max(0, (start_len - r) // P) * P
    kq = fake_quant_pages(hist_k, spec.k, nq)
    vq = fake_quant_pages(hist_v, spec.v, nq)
    outs = np.zeros((n, HQ, D))
    g = HQ // H
    for i in range(n):
        t = start_len + i
        ks = np.concatenate([kq[:, :nq], hist_k[:, nq : t + 1]], axis=1).astype(np.float64)
        vs = np.concatenate([vq[:, :nq], hist_v[:, nq : t + 1]], axis=1).astype(np.float64)
        for hq in range(HQ):
            s = ks[hq // g] @ q[i, hq].astype(np.float64) / np.sqrt(D)
            p = np.exp(s - s.max())
            outs[i, hq] = (p / p.sum()) @ vs[hq // g]
    return outs


SPECS = [
    LayerSpec(KVSpec(bits=4, axis="channel", group_size=16), KVSpec(bits=2, group_size=16), residual_length=8),
    LayerSpec(KVSpec(bits=8, symmetric=True, group_size=32), KVSpec(bits=16), residual_length=0),
    LayerSpec(KVSpec(bits=2, axis="channel", group_size=8), KVSpec(bits=4, axis="channel", group_size=16), 20),
    LayerSpec(KVSpec(bits=16), KVSpec(bits=16), residual_length=0),
]


_attend = jax.jit(lambda layer, q, k, v, batch: kc.attend(layer, q, k, v, batch, backend="reference"))
_append = jax.jit(lambda layer, k, v, batch: kc.append(layer, k, v, batch, backend="reference"))


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"k{s.k.bits}{s.k.axis[0]}-v{s.v.bits}{s.v.axis[0]}-r{s.residual_length}"
)
def test_steps_match_simulation(spec):
    """Prefill chunks of ragged lengths, then decode steps with a padding row: every output and the final cache."""
    rng = np.random.default_rng(0)
    num_pages, max_seqs, max_pages = 24, 4, 8
    cfg = kc.CacheConfig(1, H, D, P, num_pages, max_seqs, dtype="float32")
    cache = kc.init_cache((spec,), cfg)
    alloc = PageAllocator(num_pages)
    layer = cache.layers[0]
    # poison the pools: a read of a page nobody wrote would show up as garbage
    layer = jax.tree.map(
        lambda a: jnp.asarray(rng.integers(0, 255, a.shape).astype(a.dtype)) if a.dtype == jnp.uint8 else a, layer
    )
    seqs = [SequencePages(slot=s) for s in (2, 0, 3)]
    hist_k = [np.zeros((H, 0, D), np.float32) for _ in seqs]
    hist_v = [np.zeros((H, 0, D), np.float32) for _ in seqs]
    schedule = [[37, 5, 16], [20, 0, 31], [1, 1, 1], [1, 0, 1], [1, 1, 1], [3, 1, 1]] + [[1, 1, 1]] * 8
    for step in schedule:
        t = max(step)
        lengths = np.array([s.length for s in seqs], np.int32)
        for s, n in zip(seqs, step, strict=True):
            need = pages_needed(s.length + n, spec.residual_length, P)
            s.pages += alloc.allocate(need - len(s.pages))
        q = rng.normal(size=(3, t, HQ, D)).astype(np.float32)
        k = (rng.normal(size=(3, t, H, D)) * np.linspace(0.5, 3, D)).astype(np.float32)  # uneven channels
        v = rng.normal(size=(3, t, H, D)).astype(np.float32)
        batch = kc.BatchInfo(
            page_table=jnp.asarray(table_rows(seqs, max_pages)),
            lengths=jnp.asarray(lengths),
            num_new=jnp.asarray(np.array(step, np.int32)),
            slots=jnp.asarray(np.array([s.slot for s in seqs], np.int32)),
        )
        out = _attend(layer, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), batch)
        layer = _append(layer, jnp.asarray(k), jnp.asarray(v), batch)
        for b, n in enumerate(step):
            hist_k[b] = np.concatenate([hist_k[b], k[b, :n].transpose(1, 0, 2)], axis=1)
            hist_v[b] = np.concatenate([hist_v[b], v[b, :n].transpose(1, 0, 2)], axis=1)
            if n:
                want = expected_outputs(q[b], hist_k[b], hist_v[b], int(lengths[b]), n, spec)
                # f32 attention vs f64 simulation over <= 100 keys; codes identical, so only rounding differs
                np.testing.assert_allclose(np.asarray(out[b, :n]), want, atol=2e-5, rtol=1e-4)
            seqs[b].length += n
    # Read back: pages hold each page quantized once from full-precision tokens; the tail holds the rest exactly.
    table = table_rows(seqs, max_pages)
    for b, s in enumerate(seqs):
        got_k, got_v = kc.read_sequence(layer, jnp.asarray(table[b]), s.length, s.slot)
        nq = max(0, (s.length - spec.residual_length) // P) * P
        np.testing.assert_array_equal(np.asarray(got_k), fake_quant_pages(hist_k[b], spec.k, nq))
        np.testing.assert_array_equal(np.asarray(got_v), fake_quant_pages(hist_v[b], spec.v, nq))


def test_padding_rows_and_foreign_pages_untouched():
    """A row with num_new == 0 must not touch its slot; pages not in a written sequence's table stay byte-equal."""
    spec = SPECS[0]
    cfg = kc.CacheConfig(1, H, D, P, 12, 3, dtype="float32")
    rng = np.random.default_rng(1)
    layer = kc.init_cache((spec,), cfg).layers[0]
    layer = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(a.dtype)), layer)
    before = jax.tree.map(np.asarray, layer)
    t = 40
    pt = np.full((2, 4), INVALID_PAGE, np.int32)
    pt[0, :2] = [5, 7]
    batch = kc.BatchInfo(
        page_table=jnp.asarray(pt),
        lengths=jnp.array([0, 3], jnp.int32),
        num_new=jnp.array([t, 0], jnp.int32),
        slots=jnp.array([1, 2], jnp.int32),
    )
    k = jnp.asarray(rng.normal(size=(2, t, H, D)).astype(np.float32))
    after = jax.tree.map(np.asarray, kc.append(layer, k, k, batch, backend="reference"))
    written = {5, 7}
    for name in ("k", "v"):
        a, b = getattr(after, name), getattr(before, name)
        for arr_a, arr_b in ((a.codes, b.codes), (a.scale, b.scale), (a.zero, b.zero)):
            if arr_a is None:
                continue
            for pg in range(cfg.num_pages):
                if pg not in written:
                    np.testing.assert_array_equal(arr_a[:, pg], arr_b[:, pg])
        assert not np.array_equal(a.codes[:, 5], b.codes[:, 5])
    for tail in ("k_tail", "v_tail"):
        np.testing.assert_array_equal(getattr(after, tail)[:, [0, 2]], getattr(before, tail)[:, [0, 2]])


def test_budget_to_pages_counts_every_byte():
    specs = tuple(SPECS)
    cfg = kc.CacheConfig(len(specs), H, D, P, 1, 4)
    per_page = sum(kc.layer_bytes_per_page(s, cfg) for s in specs)
    budget = kc.tail_bytes(specs, cfg) + 10 * per_page + per_page // 2
    assert kc.pages_for_budget(specs, cfg, budget) == 10
    with pytest.raises(kc.CacheError):
        kc.pages_for_budget(specs, cfg, kc.tail_bytes(specs, cfg))
    # 4-bit channel keys, 2-bit token values, fp16 scale+zero per group, per head per page:
    k_bytes = P * D // 2 + (P // 16) * D * 2 * 2
    v_bytes = P * D // 4 + P * (D // 16) * 2 * 2
    assert kc.layer_bytes_per_page(SPECS[0], cfg) == H * (k_bytes + v_bytes)


@given(
    length=st.integers(0, 5000),
    step=st.integers(1, 600),
    residual=st.integers(0, 256),
    page_size=st.sampled_from([16, 32, 64, 128]),
)
def test_flush_bound_covers_every_step(length, step, residual, page_size):
    """A step must never complete more pages than `append` gathers (they would never be written): counted against
    Q(L) computed in plain integers, and the ring must hold what stays in the tail (at most C - 1 tokens)."""

    def q(n):
        return max(0, (n - residual) // page_size) * page_size

    spec = LayerSpec(KVSpec(bits=16), KVSpec(bits=16), residual_length=residual)
    completed = (q(length + step) - q(length)) // page_size
    assert completed <= kc.max_flush_pages(spec, page_size, step)
    assert length + step - q(length + step) <= kc.tail_capacity(residual, page_size) - 1
