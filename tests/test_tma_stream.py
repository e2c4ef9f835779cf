"""benchmarks/tma_stream.py, the Mosaic GPU page-streaming probe: on the CPU (GPU interpret mode) it reads exactly the
pages the page table names, for every split and head, as numpy does, in every layout (stored, paired, joined, kvblocks,
kvparts, parts, rowloads); the paired, joined, kvblocks, kvparts and parts pools hold the stored bytes; it lowers for
CUDA (so the GPU run compiles what was tested); its driver runs end to end with the timing helpers it shares with
benchmarks/attention.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bench import load_benchmark
from jax import export

tma = load_benchmark("tma_stream.py")


def _setup(config: str, b: int, m: int, extra: int, seed: int, layout: str = "stored", page: int = 64):
    key = jax.random.key(seed)
    stores = tma.layout_pools(config, b * m + extra, page, key, layout)
    perm = jax.random.permutation(jax.random.fold_in(key, 1), b * m + extra)[: b * m]
    return stores, perm.reshape(b, m).astype(jnp.int32)


@pytest.mark.parametrize(
    "config,splits,stages,layout",
    [
        ("4/4", 2, 3, "stored"),
        ("2/2", 1, 2, "stored"),
        ("16/16", 3, 2, "stored"),
        ("4/4", 2, 2, "paired"),
        ("4/4", 2, 3, "joined"),
        ("2/2", 1, 2, "joined"),
        ("4/4", 2, 3, "kvblocks"),
        ("2/2", 1, 2, "kvblocks"),
        ("4/2", 1, 2, "kvblocks"),
        ("4/4", 2, 3, "kvparts"),
        ("2/2", 1, 2, "kvparts"),
        ("8/8", 1, 2, "kvparts"),
        ("4/4", 2, 3, "parts"),
        ("2/2", 1, 2, "parts"),
        ("16/16", 1, 2, "parts"),
        ("4/4", 2, 3, "rowloads"),
        ("2/2", 1, 4, "rowloads"),
        ("16/16", 1, 2, "rowloads"),
    ],
)
def test_streams_the_named_pages(config, splits, stages, layout):
    stores, table = _setup(config, 2, 3 * splits, 5, seed=len(config) + splits, layout=layout)
    kw = tma.stream_kw(stores, layout, 64)
    got = tma.stream_pages(stores, table, splits=splits, stages=stages, interpret=True, **kw)
    stores = tma.views(stores, kw)
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
    paired, _ = _setup("4/4", 2, 3, 1, seed=2, layout="paired")
    assert [x.ndim for x in stored] == [4, 3, 3, 4, 3, 3] and [x.ndim for x in paired] == [4, 3, 4, 3]
    for s, z, both in ((stored[1], stored[2], paired[1]), (stored[4], stored[5], paired[3])):
        np.testing.assert_array_equal(np.asarray(both), np.concatenate([np.asarray(s), np.asarray(z)], axis=2))
        assert not np.array_equal(np.asarray(s), np.asarray(z))


@pytest.mark.parametrize(
    "config,page,expect_pad", [("4/4", 64, 0), ("2/2", 64, 0), ("8/8", 64, 0), ("16/16", 64, 0), ("4/4", 16, 96)]
)
def test_joined_layout_holds_the_same_bytes(config, page, expect_pad):
    """`joined`: page n of head h is one block, K codes, K rows, V codes, V rows in order (the stored pools' words),
    zero-padded to whole rows of JOIN_WIDTH words."""
    stored, _ = _setup(config, 2, 3, 1, seed=4, page=page)
    (joined,) = tma.layout_pools(config, 7, page, jax.random.key(4), "joined")
    h, n, r, c = joined.shape
    assert c == tma.JOIN_WIDTH and r <= 256  # a TMA box is at most 256 elements a dimension
    want = np.concatenate([np.ascontiguousarray(x).reshape(h, n, -1).view(np.uint32) for x in stored], axis=2)
    got = np.asarray(joined).reshape(h, n, -1)
    assert got.shape[2] - want.shape[2] == expect_pad
    np.testing.assert_array_equal(got[:, :, : want.shape[2]], want)
    assert not got[:, :, want.shape[2] :].any()


@pytest.mark.parametrize("config", ["4/4", "2/2", "8/8", "4/2"])
def test_kvblocks_layout_holds_the_same_bytes(config):
    """`kvblocks`: page n of head h is one block of K's codes, scale and zero-point rows, and one of V's, with no
    padding at pages of 64 (whole rows of KV_WIDTH words); an odd number of rows is read back in two regions that
    together cover every row."""
    stored, _ = _setup(config, 2, 3, 1, seed=8)
    blocks = tma.layout_pools(config, 7, 64, jax.random.key(8), "kvblocks")
    assert len(blocks) == 2 and [x.ndim for x in stored] == [4, 3, 3, 4, 3, 3]
    for block, side in zip(blocks, (stored[:3], stored[3:]), strict=True):
        h, n, r, c = block.shape
        assert c == tma.KV_WIDTH and r <= 256
        want = np.concatenate([np.ascontiguousarray(x).reshape(h, n, -1).view(np.uint32) for x in side], axis=2)
        np.testing.assert_array_equal(np.asarray(block).reshape(h, n, -1), want)
        regions = tma.read_regions(block.shape, joined=True)
        covered = set().union(*(range(first, first + rows) for first, rows in regions))
        assert covered == set(range(r)) and all((rows * c) % 128 == 0 for _, rows in regions)


@pytest.mark.parametrize("config", ["4/4", "2/2", "8/8"])
def test_kvparts_layout_holds_the_kvblocks_bytes(config):
    """`kvparts`: the same words a page as `kvblocks`, in rows as wide as a code row, so that a page's first P rows
    are its code tile (copied swizzled where rows are 128 bytes) and the rest its scale and zero-point rows."""
    blocks = tma.layout_pools(config, 7, 64, jax.random.key(9), "kvblocks")
    parts = tma.layout_pools(config, 7, 64, jax.random.key(9), "kvparts")
    stored, _ = _setup(config, 2, 3, 1, seed=9)
    for b, pt, codes in zip(blocks, parts, (stored[0], stored[3]), strict=True):
        h, n = b.shape[:2]
        assert pt.shape[3] == codes.shape[3] and pt.shape[2] > 64
        np.testing.assert_array_equal(np.asarray(pt).reshape(h, n, -1), np.asarray(b).reshape(h, n, -1))
        np.testing.assert_array_equal(np.asarray(pt)[:, :, :64], np.asarray(codes))


@pytest.mark.parametrize("config,page", [("4/4", 64), ("2/2", 64), ("8/8", 32)])
def test_parts_layout_holds_the_same_bytes(config, page):
    """`parts`: page n of head h is K's code rows, V's, then the scale and zero-point rows' words (as `joined` orders
    them, zero-padded to whole code rows); the scale rows start at a multiple of their count, as TMA's block index
    needs."""
    stored, _ = _setup(config, 2, 3, 1, seed=6, page=page)
    (pool,) = tma.layout_pools(config, 7, page, jax.random.key(6), "parts")
    parts = tma.parts_of(pool, page)
    assert len(parts) == 3 and all(first % rows == 0 for first, rows in parts)
    kc, vc = np.asarray(stored[0]), next(np.asarray(x) for x in stored[1:] if x.ndim == 4)
    got = np.asarray(pool)
    np.testing.assert_array_equal(got[:, :, :page], kc)
    np.testing.assert_array_equal(got[:, :, page : 2 * page], vc)
    h, n = kc.shape[:2]
    rows = np.concatenate([np.ascontiguousarray(x).reshape(h, n, -1).view(np.uint32) for x in stored if x.ndim != 4], 2)
    tail = got[:, :, 2 * page :].reshape(h, n, -1)
    np.testing.assert_array_equal(tail[:, :, : rows.shape[2]], rows)
    assert not tail[:, :, rows.shape[2] :].any()


@pytest.mark.parametrize("layout", ["stored", "paired", "joined", "kvblocks", "kvparts", "parts", "rowloads"])
def test_lowers_for_cuda(layout):
    stores, table = _setup("4/4", 2, 8, 1, seed=5, layout=layout)
    args = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in stores], jax.ShapeDtypeStruct(table.shape, table.dtype))
    kw = tma.stream_kw(stores, layout, 64)
    fn = jax.jit(lambda s, t: tma.stream_pages(s, t, splits=2, stages=4, **kw))
    exp = export.export(fn, platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exp.mlir_module()


def test_driver_end_to_end(tmp_path):
    out = tmp_path / "tma.json"
    argv = "--batch 2 --context 256 --configs 4/4 --splits 2 --stages 2 --no-triton --no-jax --trials 1 --reps 1"
    argv += " --layouts stored,paired,joined,parts,rowloads,kvblocks,kvparts"
    argv += " --interpret"
    tma.main(argv.split() + ["--out", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    layouts = ["stored", "paired", "joined", "parts", "rowloads", "kvblocks", "kvparts"]
    assert [r["layout"] for r in rows] == layouts and not any("error" in r for r in rows), rows
    for r in rows:
        assert r["check_rel_err"] <= 1e-5 and r["bytes_written"] > 0 and r["pct_bw"] > 0
    # the same bytes read every way (only the number of copies differs; 4/4 pages of 64 need no padding when joined);
    # paired writes one sum where stored writes two, and joined's and parts' ORs of a block are as many words as
    # paired writes
    assert len({r["bytes_read"] for r in rows}) == 1
    assert rows[0]["bytes_written"] > rows[1]["bytes_written"] == rows[2]["bytes_written"] == rows[3]["bytes_written"]
    assert rows[4]["bytes_written"] == rows[0]["bytes_written"]  # rowloads: the stored pools, read another way
    # kvblocks: K's and V's blocks each read back as 16 rows and the last 2 (one row twice) of 64 words a page
    assert rows[5]["bytes_written"] == rows[2]["bytes_written"] * 36 // 34
    # kvparts: each side's code tile OR-ed whole (1024 words) and its 64 words of rows
    assert rows[6]["bytes_written"] == rows[2]["bytes_written"]


def test_timing_helpers_get_every_setting_attention_reads():
    """The JAX baseline and the Triton row call benchmarks/attention.py's helpers with `_bench_args`: every option of
    attention.py's command line is there (a missing `loop` once broke the JAX row on the GPU), with this run's
    settings where tma_stream has its own."""
    import argparse

    args = argparse.Namespace(max_copies=3, reps=7, trials=2, jax_grid="8:32", jax_page=16)
    ns = tma._bench_args(args)
    defaults = vars(tma.bench.parser().parse_args([]))
    assert set(defaults) <= set(vars(ns)), set(defaults) - set(vars(ns))
    assert (ns.max_copies, ns.reps, ns.trials, ns.jax_grid, ns.loop) == (3, 7, 2, "8:32", "fori")


def test_refuses_a_block_the_warpgroup_cannot_read_evenly():
    """4/4 pages of 32 as `parts`: the scale rows are 64 words, fewer than the warpgroup's 128 threads; a clear error
    names the block, where Python used to stop the driver with a bare StopIteration."""
    stores, table = _setup("4/4", 2, 2, 1, seed=7, layout="parts", page=32)
    with pytest.raises(ValueError, match=r"block of \(4, 16\) words"):
        tma.stream_pages(stores, table, splits=1, stages=2, interpret=True, **tma.stream_kw(stores, "parts", 32))
