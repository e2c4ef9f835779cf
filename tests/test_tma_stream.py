"""benchmarks/tma_stream.py, the Mosaic GPU page-streaming probe: on the CPU (GPU interpret mode) it reads exactly the
pages the page table names, for every split and head, as numpy does; it lowers for CUDA (so the GPU run compiles what
was tested); and its driver runs end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bench import load_benchmark
from jax import export

tma = load_benchmark("tma_stream.py")


def _setup(config: str, b: int, m: int, extra: int, seed: int, paired: bool = False):
    key = jax.random.key(seed)
    stores = tma.pools(config, b * m + extra, 64, key, paired)
    perm = jax.random.permutation(jax.random.fold_in(key, 1), b * m + extra)[: b * m]
    return stores, perm.reshape(b, m).astype(jnp.int32)


@pytest.mark.parametrize(
    "config,splits,stages,paired",
    [("4/4", 2, 3, False), ("2/2", 1, 2, False), ("16/16", 3, 2, False), ("4/4", 2, 2, True)],
)
def test_streams_the_named_pages(config, splits, stages, paired):
    stores, table = _setup(config, 2, 3 * splits, 5, seed=len(config) + splits, paired=paired)
    got = tma.stream_pages(stores, table, splits=splits, stages=stages, interpret=True)
    want = tma.reference(stores, table, splits)
    assert len(got) == len(want) == len(stores)
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        assert g.shape == w.shape
        if w.dtype == np.float64:
            # f16 scales summed over <= 3 pages in float32: exact to float32 rounding
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(g, w)
    # the comparison is not blind to which pages are read: the two sequences' tables swapped give other ORs
    other = tma.reference(stores, table[::-1], splits)
    assert not np.array_equal(np.asarray(got[0]), other[0])


def test_paired_layout_holds_the_same_rows():
    """`paired`: K's and V's scale and zero-point rows side by side, one pool each, the same values page by page."""
    stored, _ = _setup("4/4", 2, 3, 1, seed=2)
    paired, _ = _setup("4/4", 2, 3, 1, seed=2, paired=True)
    assert [x.ndim for x in stored] == [4, 3, 3, 4, 3, 3] and [x.ndim for x in paired] == [4, 3, 4, 3]
    for s, z, both in ((stored[1], stored[2], paired[1]), (stored[4], stored[5], paired[3])):
        np.testing.assert_array_equal(np.asarray(both), np.concatenate([np.asarray(s), np.asarray(z)], axis=2))
        assert not np.array_equal(np.asarray(s), np.asarray(z))


@pytest.mark.parametrize("paired", [False, True])
def test_lowers_for_cuda(paired):
    stores, table = _setup("4/4", 2, 8, 1, seed=5, paired=paired)
    args = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in stores], jax.ShapeDtypeStruct(table.shape, table.dtype))
    exp = export.export(jax.jit(lambda s, t: tma.stream_pages(s, t, splits=2, stages=4)), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exp.mlir_module()


def test_driver_end_to_end(tmp_path):
    out = tmp_path / "tma.json"
    argv = "--batch 2 --context 256 --configs 4/4 --splits 2 --stages 2 --no-triton --no-jax --trials 1 --reps 1"
    argv += " --layouts stored,paired"
    argv += " --interpret"
    tma.main(argv.split() + ["--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["stored", "paired"] and not any("error" in r for r in rows), rows
    for r in rows:
        assert r["check_rel_err"] <= 1e-5 and r["bytes_written"] > 0
    # the same bytes read either way (only the number of copies differs); paired writes one sum where stored writes two
    assert rows[0]["bytes_read"] == rows[1]["bytes_read"] and rows[0]["bytes_written"] > rows[1]["bytes_written"]
