"""Race detection for the TPU (Mosaic) kernels under the TPU interpreter, on CPU.

`pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)` runs the grid's "parallel" axes split over two
simulated cores (megacore) with a happens-before race detector on every DMA and block copy; a race sets
`interpret_pallas_call.races.races_found` (reset at the start of each interpreted call). The kernels use
`dimension_semantics=("parallel", ...)`, so this is the split they get on a megacore chip.

First a toy kernel shows the detector has teeth (two parallel programs writing the same output block is flagged,
distinct blocks are not); then the write and attention kernels, a few small specs each, must be race-free and still
correct. Outputs are checked against the references with the same tolerances as their own test files.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from test_paged_attention_tpu import ATOL, RTOL, _problem, _reference

from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout, paged_attention_tpu, quantize_write_tpu
from pallas_kernels.quantize_write import quantize_write_reference

RACES = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


def _races_found() -> bool:
    return bool(tpu_interpreter.races is not None and tpu_interpreter.races.races_found)


def _toy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0


@functools.partial(jax.jit, static_argnames=("same_block",))
def _toy(x, *, same_block: bool):
    """Grid (2,) "parallel": program i doubles row block i of x [16, 128] into output block 0 (same_block, a race:
    both cores write it) or block i (disjoint)."""
    return pl.pallas_call(
        _toy_kernel,
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), (lambda i: (0, 0)) if same_block else (lambda i: (i, 0))),
        out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=RACES,
    )(x)


def test_detector_flags_two_cores_writing_one_block(rng):
    x = jnp.asarray(rng.standard_normal((16, 128)), jnp.float32)
    out = _toy(x, same_block=False)
    assert not _races_found()
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))  # exact: doubling is exact in f32
    _toy(x, same_block=True)
    assert _races_found()


def _random_like(rng, a):
    if a.dtype == jnp.uint8:
        return jnp.asarray(rng.integers(0, 256, a.shape, dtype=np.uint8))
    return jnp.asarray(rng.standard_normal(a.shape), a.dtype)


def _spec(bits, axis, group, sym=False, sdt="float16"):
    return KVSpec(bits=bits, axis=axis, group_size=group, symmetric=sym, scale_dtype=sdt)


@pytest.mark.parametrize(
    "spec,p,d",
    [
        (_spec(2, "token", 32, sym=True), 16, 64),
        (_spec(8, "channel", 16, sdt="bfloat16"), 16, 128),
        (_spec(16, "token", 64), 16, 64),  # unquantized bf16 pool: codes only
    ],
    ids=["b2-token-sym", "b8-channel", "b16"],
)
def test_write_kernel_race_free_on_two_cores(spec, p, d, rng):
    """Pages on both cores (grid (M=5, H=2), both axes parallel), one skipped (dest -1); bit-exact vs the reference,
    other pages untouched. Then pages 1 and 3 (on different cores) both go to page 0: that must be flagged.

    The detector is dynamic (happens-before over the interpreter's actual interleaving), so it can miss a race: with
    this grid, pages 0 and 3 sharing a destination go unreported in jax 0.11.2. A clean result is evidence, not proof.
    """
    h, n, m = 2, 7, 5
    pool = layout.allocate(spec, h, n, p, d)
    pool = tuple(None if a is None else _random_like(rng, a) for a in pool)  # stale bytes, so "untouched" can fail
    pages = jnp.asarray(rng.standard_normal((h, m, p, d)) * 3.0, jnp.float32)
    dest = jnp.array([6, 0, -1, 2, 4], jnp.int32)
    got = quantize_write_tpu.quantize_write(*pool, pages, dest, spec=spec, interpret=RACES)
    assert not _races_found()
    want = quantize_write_reference(*pool, pages, dest, spec=spec)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:  # exact: same float32 expressions as the reference (see test_quantize_write)
            np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))
    quantize_write_tpu.quantize_write(*pool, pages, jnp.array([6, 0, -1, 0, 4], jnp.int32), spec=spec, interpret=RACES)
    assert _races_found()


@pytest.mark.parametrize("i,ppb", [(3, 1), (9, 2)], ids=["k2-v16-ppb1", "k8-v4-ppb2"])
def test_attention_kernel_race_free_on_two_cores(i, ppb):
    """Batch and head grid axes split over 2 simulated cores; no race, and the same output as the reference
    (tolerance: float32 reassociation only, derived in test_paged_attention_tpu)."""
    _, q, k_pool, v_pool, tail, kw, _ = _problem(i, mp=3)
    got_o, got_l = paged_attention_tpu.paged_attention(
        q, *k_pool, *v_pool, *tail, **kw, interpret=RACES, pages_per_block=ppb
    )
    assert not _races_found()
    want_o, want_l = _reference(q, *k_pool, *v_pool, *tail, **kw)
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(want_l), atol=ATOL, rtol=RTOL)
