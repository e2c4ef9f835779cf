"""TPU paged attention kernel (Mosaic, run under `pltpu.InterpretParams()` on CPU) against `paged_attention_reference`.

Matrix: every (K bits, V bits) pair in {2, 4, 8, 16}^2 once; key axis, symmetric/asymmetric, GQA group 1/4/8,
head_dim 64/128, page size, query length and q dtype rotate over the pairs. Each batch is ragged: one sequence uses
its whole page table, one a single page (its next table entry is a stale page of another sequence), one none
(num_tokens 0 -> out 0, lse -inf). A second test fills every unowned page with random bytes (NaN scales included)
and checks the kernel's output does not change at all.

Tolerance: K and V are dequantized in the kernel with the reference's own float32 expressions (bit-identical
values, checked by test_quantize_write's tile test), so only float32 reassociation differs: dot products over
D <= 128 channels and softmax sums over <= 64 tokens of terms of magnitude <= ~20 give a worst-case bound of about
(128 + 64) * 6e-8 * 20 ~= 2e-4 on scores and outputs; typical is ~1e-6. A wrong page, group or shift is O(0.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bench import load_benchmark

from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout, paged_attention_tpu
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.quantize_write import quantize_write_reference

ATOL = RTOL = 2e-4
# Jitted once per spec: the eager reference costs more than the kernel in interpret mode.
_reference = jax.jit(paged_attention_reference, static_argnames=("k_spec", "v_spec", "sm_scale"))
BITS = (2, 4, 8, 16)
PAIRS = [(kb, vb) for kb in BITS for vb in BITS]


def _case(i: int, kb: int, vb: int):
    d = (64, 128)[(i // 2) % 2]
    p = (16, 32)[(i // 3) % 2]
    k_axis = ("channel", "token")[i % 2]
    v_axis = ("token", "channel")[(i // 4) % 2]
    sym = (i // 2) % 2 == 1
    k_group = 8 if k_axis == "channel" else d // (1 + i % 2)
    v_group = p if v_axis == "channel" else d // 2
    k_spec = KVSpec(bits=kb, axis=k_axis, group_size=k_group, symmetric=sym)
    v_spec = KVSpec(bits=vb, axis=v_axis, group_size=v_group, symmetric=not sym, scale_dtype="bfloat16")
    gqa = (1, 4, 8)[i % 3]
    tq = 2 if i % 5 == 0 else 1
    return k_spec, v_spec, gqa, tq, p, d


def _pool(rng, spec, h, n, p, d):
    """A pool with quantized K or V in every page: the pages a test's table uses and stale pages of other sequences."""
    arrs = layout.allocate(spec, h, n, p, d)
    x = rng.standard_normal((h, n, p, d)) * rng.uniform(0.5, 3.0, (1, 1, 1, d)) + rng.normal(0, 1, (1, 1, 1, d))
    return quantize_write_reference(*arrs, jnp.asarray(x, jnp.float32), jnp.arange(n, dtype=jnp.int32), spec=spec)


def _poison(rng, pool, pages):
    """Random bytes (NaN/Inf scales included) in `pages` of every pool array."""
    out = []
    for a in pool:
        if a is None:
            out.append(None)
            continue
        raw = np.array(a).view(np.uint8)
        raw[:, pages] = rng.integers(0, 256, raw[:, pages].shape, dtype=np.uint8)
        out.append(jnp.asarray(raw.view(a.dtype)))
    return tuple(out)


def _problem(i: int, mp: int = 2):
    kb, vb = PAIRS[i]
    k_spec, v_spec, gqa, tq, p, d = _case(i, kb, vb)
    b, h, n = 3, 2, 9
    rng = np.random.default_rng(100 + i)
    perm = rng.permutation(n)
    lengths = np.array([mp, 1, 0])  # pages per sequence: full table, one page, empty
    table = np.full((b, mp), -1, np.int32)
    table[0] = perm[:mp]
    table[1] = perm[mp : 2 * mp]  # table[1, 1:] lies past the end of sequence 1: stale pages that must not count
    q = jnp.asarray(rng.standard_normal((b, h * gqa, tq, d)), jnp.bfloat16 if i % 4 == 3 else jnp.float32)
    k_pool = _pool(rng, k_spec, h, n, p, d)
    v_pool = _pool(rng, v_spec, h, n, p, d)
    tail = (jnp.asarray(table), jnp.asarray(lengths * p, jnp.int32))
    kw = dict(k_spec=k_spec, v_spec=v_spec, sm_scale=d**-0.5)
    unused = [int(x) for x in perm[mp + 1 :]]  # no sequence owns these (incl. those past the end of sequence 1)
    return rng, q, k_pool, v_pool, tail, kw, unused


@pytest.mark.parametrize("i", range(len(PAIRS)), ids=[f"k{kb}-v{vb}" for kb, vb in PAIRS])
def test_tpu_attention_matches_reference(i):
    _, q, k_pool, v_pool, tail, kw, _ = _problem(i)
    want_o, want_l = _reference(q, *k_pool, *v_pool, *tail, **kw)
    got_o, got_l = paged_attention(q, *k_pool, *v_pool, *tail, **kw, backend="tpu", interpret=True)
    assert got_o.shape == want_o.shape and got_l.shape == want_l.shape
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(want_l), atol=ATOL, rtol=RTOL)
    # num_tokens 0: out exactly 0, lse exactly -inf (not NaN).
    assert np.all(np.asarray(got_o[2]) == 0) and np.all(np.asarray(got_l[2]) == -np.inf)


@pytest.mark.parametrize("i,ppb", [(5, 1), (10, 2)])
def test_tpu_attention_pages_per_block(i, ppb):
    """One page per step, and blocks of 2 pages over a 3-page table (the last block half past the table's end)."""
    _, q, k_pool, v_pool, tail, kw, _ = _problem(i, mp=3)
    want_o, want_l = _reference(q, *k_pool, *v_pool, *tail, **kw)
    got_o, got_l = paged_attention_tpu.paged_attention(
        q, *k_pool, *v_pool, *tail, **kw, interpret=True, pages_per_block=ppb
    )
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(want_l), atol=ATOL, rtol=RTOL)
    # num_tokens beyond the table (4 pages for 3): like the reference, every table page counts once.
    over = (tail[0], tail[1].at[0].set(tail[1][0] + tail[1][0] // 3))
    want_o, want_l = _reference(q, *k_pool, *v_pool, *over, **kw)
    got_o, got_l = paged_attention_tpu.paged_attention(
        q, *k_pool, *v_pool, *over, **kw, interpret=True, pages_per_block=ppb
    )
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(want_l), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("i", [6])
def test_tpu_attention_reads_only_owned_pages(i):
    """Random bytes in every page no sequence owns (incl. page 0, the clamp target of INVALID entries, when unowned,
    and the table entry past a sequence's end) change nothing: the kernel never reads past num_tokens."""
    rng, q, k_pool, v_pool, tail, kw, unused = _problem(i)
    clean = paged_attention(q, *k_pool, *v_pool, *tail, **kw, backend="tpu", interpret=True)
    k_bad, v_bad = _poison(rng, k_pool, unused), _poison(rng, v_pool, unused)
    dirty = paged_attention(q, *k_bad, *v_bad, *tail, **kw, backend="tpu", interpret=True)
    for c, d in zip(clean, dirty, strict=True):
        np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_tpu_attention_two_cores_no_races():
    """Megacore: batch and head grid axes split over 2 simulated cores, with the race detector on."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
    from jax.experimental.pallas import tpu as pltpu

    _, q, k_pool, v_pool, tail, kw, _ = _problem(6, mp=3)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    got_o, got_l = paged_attention_tpu.paged_attention(
        q, *k_pool, *v_pool, *tail, **kw, interpret=params, pages_per_block=2
    )
    assert not tpu_interpreter.races.races_found
    want_o, want_l = _reference(q, *k_pool, *v_pool, *tail, **kw)
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(want_l), atol=ATOL, rtol=RTOL)


def test_tpu_kernel_dequantizes_without_float32_matmuls():
    """The kernel's matmul work per page (benchmarks/tpu_kernel_ops.py, from its jaxpr): token-axis pages are
    unpacked in place, so a per-token 4/4 or 2/2 layer runs only its attention dots (one per field), and what
    selection matmuls remain (group scales, channel-axis rows) are single-pass bf16, never a float32 HIGHEST matmul
    (~6 passes)."""
    tpu_kernel_ops = load_benchmark("tpu_kernel_ops.py")
    d = 128
    for kb, vb in ((4, 4), (2, 2)):
        ks, vs = (KVSpec(bits=b, axis="token", group_size=d) for b in (kb, vb))
        ds = tpu_kernel_ops.kernel_dots(ks, vs, head_dim=d)
        assert [x["kind"] for x in ds] == ["attention"] * (8 // kb + 8 // vb)
        assert sum(x["m"] * x["n"] * x["k"] for x in ds) == 2 * 4 * 64 * d  # q.k and p.v over the page
    kivi = (KVSpec(bits=4, axis="channel", group_size=32), KVSpec(bits=2, axis="token", group_size=32))
    ds = tpu_kernel_ops.kernel_dots(*kivi, head_dim=d)
    sel = [x for x in ds if x["kind"] == "select"]
    assert sel and all(x["passes"] == 1 and x["dtypes"] == ("bfloat16", "bfloat16") for x in sel)
