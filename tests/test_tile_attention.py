"""The shared online-softmax step (`tile_attention.online_softmax_step`, both kernels' orientations) and the split
combine against a float64 numpy softmax over the whole sequence.

Blocks of base-2 scores, some entries masked (-inf), one block wholly masked, and a late block whose scores exceed
everything before by ~300 (2^300 overflows float32, so the running maximum must rescale what was summed), are
folded one at a time; the result must equal softmax-weighted values to float32 accuracy (2e-6 relative: a few
rounding steps per block, nothing like the order-1 errors of a wrong rescale, mask or orientation).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tile_attention as ta


def _blocks(rng, rows=5, tokens=24, block=8, d=6):
    s = rng.normal(0, 4, (tokens, rows))
    s[rng.random(s.shape) < 0.2] = -np.inf
    s[block : 2 * block] = -np.inf  # a wholly masked block
    s[2 * block + 3] += 300.0  # a late score far above every earlier one
    v = rng.normal(0, 1, (tokens, d))
    return s, v, block


def _want(s, v):
    w = np.exp2(s - s.max(axis=0))  # float64
    return (w.T @ v) / w.sum(axis=0)[:, None], s.max(axis=0) + np.log2(w.sum(axis=0))


@pytest.mark.parametrize("orientation", ["tokens_rows", "rows_tokens"])
def test_online_softmax_step_equals_a_whole_softmax(orientation, rng):
    s, v, block = _blocks(rng)
    rows = s.shape[1]
    if orientation == "tokens_rows":  # the GPU kernel: s [T, R], m, l [R], acc [D, R]
        m, l, acc = jnp.full((rows,), -jnp.inf), jnp.zeros((rows,)), jnp.zeros((v.shape[1], rows))
    else:  # the TPU kernel: s [R, T], m, l [R, 1], acc [R, D]
        m, l, acc = jnp.full((rows, 1), -jnp.inf), jnp.zeros((rows, 1)), jnp.zeros((rows, v.shape[1]))
    for t in range(0, s.shape[0], block):
        sb = jnp.asarray(s[t : t + block], jnp.float32)
        vb = jnp.asarray(v[t : t + block], jnp.float32)
        if orientation == "tokens_rows":
            m, alpha, p, l = ta.online_softmax_step(m, l, sb, axis=0)
            acc = acc * alpha[None, :] + vb.T @ p
        else:
            m, alpha, p, l = ta.online_softmax_step(m, l, sb.T, axis=1)
            acc = acc * alpha + p @ vb
        if t == block:  # the masked block: state unchanged, p = 0
            assert np.all(np.asarray(alpha) == 1.0) and np.all(np.asarray(p) == 0.0)
    out = np.asarray(acc).T / np.asarray(l).reshape(-1, 1) if orientation == "tokens_rows" else np.asarray(acc / l)
    want, want_lse = _want(s, v)
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6)
    lse = np.asarray(m).ravel() + np.log2(np.asarray(l).ravel())
    np.testing.assert_allclose(lse, want_lse, rtol=2e-6)


def test_deferred_step_and_split_combine_equal_a_whole_softmax(rng):
    """The GPU kernel's form: per-token sums deferred (summed once at the end), the sequence cut into splits whose
    partial results `combine_splits` merges; a split that saw nothing contributes nothing."""
    s, v, block = _blocks(rng, tokens=32)
    rows, d = s.shape[1], v.shape[1]
    outs, ms, ls = [], [], []
    for lo, hi in ((0, 16), (16, 16), (16, 32)):  # the middle split is empty
        m, l_acc, acc = jnp.full((rows,), -jnp.inf), jnp.zeros((block // 2, rows)), jnp.zeros((d, rows))
        for t in range(lo, hi, block):
            halves = [jnp.asarray(s[t + j : t + block : 2], jnp.float32) for j in (0, 1)]  # two token sub-blocks
            m, alpha, ps, l_acc = ta.online_softmax_step_deferred(m, l_acc, halves)
            acc = acc * alpha[None, :]
            for j, p in enumerate(ps):
                acc = acc + jnp.asarray(v[t + j : t + block : 2], jnp.float32).T @ p
        outs.append(jnp.swapaxes(acc, 0, 1))
        ms.append(m)
        ls.append(jnp.sum(l_acc, axis=0))
    out, lse = ta.combine_splits(jnp.stack(outs), jnp.stack(ms), jnp.stack(ls))
    want, want_lse = _want(s, v)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), want_lse * np.log(2.0), rtol=2e-6)


# `interleave_fields` (used to turn 32-bit words back into bytes): checked against index arithmetic in numpy.


def _fields(rng, nf, rows=3, cb=16):
    return [rng.integers(0, 16, (rows, cb)).astype(np.float32) for _ in range(nf)]


@pytest.mark.parametrize("nf", [2, 4])
def test_interleave_fields_puts_each_field_in_turn(nf, rng):
    fields = _fields(rng, nf)
    got = np.asarray(ta.interleave_fields([jnp.asarray(f) for f in fields]))
    cb = fields[0].shape[1]
    want = np.empty((fields[0].shape[0], cb * nf), np.float32)
    for j in range(nf):
        for i in range(cb):
            want[:, i * nf + j] = fields[j][:, i]
    np.testing.assert_array_equal(got, want)


def test_interleave_fields_rejects_three_fields(rng):
    with pytest.raises(ValueError, match="3 fields, expected 1, 2 or 4"):
        ta.interleave_fields([jnp.asarray(f) for f in _fields(rng, 3)])


def test_bytes_of_words_are_the_pool_s_bytes(rng):
    raw = rng.integers(0, 256, (3, 5, 32), dtype=np.uint8)
    words = raw.view("<u4")  # what the kernel reads: little-endian 32-bit words
    np.testing.assert_array_equal(np.asarray(ta.bytes_of_words(jnp.asarray(words))), raw)


def test_fixed_step_equals_a_whole_softmax_or_overflows(rng):
    """`fixed_softmax_step` against block 0's maximum (`fixed_reference`): equal to the whole softmax where later
    scores rise less than ~127 above it (here 100), and non-finite, never silently wrong, where they rise more (300),
    which is how the GPU kernel knows to redo a split."""
    for rise, finite in ((100.0, True), (300.0, False)):
        s, v, block = _blocks(rng)
        s[2 * block + 3] += rise - 300.0
        rows, d = s.shape[1], v.shape[1]
        ref = ta.fixed_reference([jnp.asarray(s[:block], jnp.float32)])
        np.testing.assert_array_equal(np.asarray(ref), s[:block].astype(np.float32).max(axis=0))
        l_acc, acc = jnp.zeros((block, rows)), jnp.zeros((d, rows))
        for t in range(0, s.shape[0], block):
            (p,), l_acc = ta.fixed_softmax_step(ref, l_acc, [jnp.asarray(s[t : t + block], jnp.float32)])
            acc = acc + jnp.asarray(v[t : t + block], jnp.float32).T @ p
        l = np.asarray(jnp.sum(l_acc, axis=0))
        if not finite:
            assert not np.all(np.isfinite(l))
            continue
        want, want_lse = _want(s, v)
        np.testing.assert_allclose(np.asarray(acc).T / l[:, None], want, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(np.asarray(ref) + np.log2(l), want_lse, rtol=2e-6)


def test_fixed_reference_of_a_masked_block_is_zero():
    """A column whose first block is wholly masked gets reference 0 (so exp2(-inf - ref) = 0, not NaN)."""
    s = np.full((8, 3), -np.inf, np.float32)
    s[2, 0] = 5.0
    np.testing.assert_array_equal(np.asarray(ta.fixed_reference([jnp.asarray(s)])), [5.0, 0.0, 0.0])
