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


def _setup(config: str, b: int, m: int, extra: int, seed: int):
    key = jax.random.key(seed)
    stores = tma.pools(config, b * m + extra, 64, key)
    perm = jax.random.permutation(jax.random.fold_in(key, 1), b * m + extra)[: b * m]
    return stores, perm.reshape(b, m).astype(jnp.int32)


@pytest.mark.parametrize("config,splits,stages", [("4/4", 2, 3), ("2/2", 1, 2), ("16/16", 3, 2)])
def test_streams_the_named_pages(config, splits, stages):
    stores, table = _setup(config, 2, 3 * splits, 5, seed=len(config) + splits)
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


def test_lowers_for_cuda():
    stores, table = _setup("4/4", 2, 8, 1, seed=5)
    args = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in stores], jax.ShapeDtypeStruct(table.shape, table.dtype))
    exp = export.export(jax.jit(lambda s, t: tma.stream_pages(s, t, splits=2, stages=4)), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exp.mlir_module()


def test_driver_end_to_end(tmp_path):
    out = tmp_path / "tma.json"
    argv = "--batch 2 --context 256 --configs 4/4 --splits 2 --stages 2 --no-triton --no-jax --trials 1 --reps 1"
    argv += " --interpret"
    tma.main(argv.split() + ["--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["check_rel_err"] <= 1e-5 and rows[0]["bytes_written"] > 0
