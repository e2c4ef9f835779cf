"""How fast can any kernel stream our packed pages? A Mosaic GPU probe: TMA copies of whole pages into shared memory.

The Triton-lowered attention kernel reads 4/4 pages at ~55% of copy bandwidth, and its "loads alone" variant (all
compute removed) reached 73% (BENCHMARKS.md). Its stall profile points at loads that land in registers and make the
warpgroup MMA fences wait; the fix proposed there is a kernel that copies pages asynchronously to shared memory
(cp.async / TMA, several pages deep), i.e. Mosaic GPU. Before anyone builds that kernel, this probe measures its
ceiling on the same pools: each program walks one sequence's pages of one KV head (a split of them) through the page
table, copies every page's K and V codes, scales and zeros with TMA into a ring of `--stages` shared-memory slots
(`plgpu.emit_pipeline`), and reads every byte back out of shared memory (OR of the code bytes, a float32 sum of the
scales and zeros), so the copies cannot be skipped. It does no attention. What it reports is the fraction of measured
copy bandwidth that page-granular TMA streaming reaches at this shape: an upper bound for a Mosaic GPU attention kernel
on these pools, next to the Triton kernel's time on the same data, in the same run.

    PYTHONPATH=. python3 benchmarks/tma_stream.py --batch 32 --context 16384 --configs 4/4,2/2,8/8,16/16

Layout: per-token quantized stores (codes `[H, N, P, D*b/8]`, one f16 scale and zero per token-head; `16/16` is bf16
`[H, N, P, D]`), as `benchmarks/attention.py` builds them. `--layouts stored,paired` also times each page's scale and
zero-point rows side by side in one pool (one copy for both, where the cache makes two): whether fewer, larger copies
raise the ceiling, before the cache's layout is changed. Every output is checked against numpy before timing.

`--layouts joined` goes to the end of that road: each page of each KV head is one contiguous block (K codes, K scale
and zero-point rows, V codes, V scale and zero-point rows, as uint32 words `[H, N, R, C]`), so a page is ONE TMA copy
of ~8.5 KB (4/4) where the stored layout makes six (two 4 KB code blocks, four 128-byte rows). It measures whether
fewer, larger copies raise the streaming ceiling above the stored layout's. The cache has no such layout (it keeps
K and V, codes and rows, in pools of their own): its rows bound what laying the cache out anew could buy.
`--layouts kvblocks` stops halfway: K's page (codes, scale and zero-point rows) is one block and V's another, two copies
a page, with K and V in pools of their own as the cache keeps them: whether a layout change inside each pool gets what
joining the whole page does (`--layouts kvparts`: the same blocks copied as their code tile and their rows, four copies
a page). `--layouts parts` keeps a page contiguous (K's code rows, V's, then the scale and zero-point rows) but copies
it in those three parts, so that an attention kernel's code tiles keep their own swizzled copies: whether contiguity or
the number of copies is what `joined` gains. `--layouts rowloads` keeps the stored pools but copies only the codes with
TMA (two copies a page) and loads the scale and zero-point rows from global memory straight into registers, two pages
ahead: whether a kernel could shed the small copies without a new cache layout.

Each row's `pct_bw` is against the best of `benchmarks/attention.py`'s bandwidth figures: with torch on the device,
its read-only sum (`torch_sum_read`), the nearer model of a kernel that reads pages and writes almost nothing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("attention_bench", ROOT / "benchmarks" / "attention.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _squeeze_page(x):
    """A per-token scale/zero pool `[H, N, P, 1]` as `[H, N, P]` (same bytes): TMA then copies one page's row."""
    return None if x is None else x.reshape(x.shape[:3])


def as_words(codes):
    """A codes pool `[H, N, P, W]` (uint8 codes, or bf16 values) as uint32 words `[H, N, P, W*itemsize/4]`: the same
    bytes (Mosaic GPU does no arithmetic on 8-bit registers, and 32-bit words are what a kernel would read). XLA
    makes this a copy of the pool, so the probe does it once, before timing, never inside the timed call."""
    h, n, p, w = codes.shape
    per = 4 // codes.dtype.itemsize
    return jax.lax.bitcast_convert_type(codes.reshape(h, n, p, w // per, per), jnp.uint32)


def read_regions(shape, joined: bool) -> list[tuple[int, int]]:
    """(first row, rows) of a 4-D pool's block that the probe reads back, each into a result of its own: the whole
    block, or for a joined block whose words the warpgroup's 128 threads cannot share evenly (an odd number of rows
    of 64 words: `kvblocks`) all rows but the last, then the last two (the second to last read twice, which an OR
    does not see)."""
    r, w = shape[2:]
    if joined and (r * w) % 128 and r > 1 and ((r - 1) * w) % 128 == 0 and (2 * w) % 128 == 0:
        return [(0, r - 1), (r - 2, 2)]
    return [(0, r)]


def stream_pages(
    stores,
    page_table,
    *,
    splits: int,
    stages: int,
    joined: bool = False,
    parts=None,
    row_loads: int = 0,
    block_rows: int = 0,
    interpret: bool = False,
):
    """Streams every page of `page_table` `[B, M]` for every KV head through shared memory with TMA.

    `stores`: a list of pools (uint32 code words `[H, N, P, W]` from `as_words`, or `[H, N, k*P]` rows of k f16 vectors
    a page: a scale or zero-point row, or `pools(paired=True)`'s scale and zero-point side by side), all indexed by
    the same physical pages; with `joined`, the one pool `[H, N, R, C]` of `join_pages`, a page a copy. Returns, per
    (sequence, head, split): the OR of each 4-D pool's words over the split's pages (`[B, H, S, P, W]` or
    `[B, H, S, R, C]` uint32) and the float32 sum of each row pool's k vectors over them (`[B, H, S, P]`), so each
    byte copied is also read. `parts` ((first row, rows) a copy, `first` a multiple of `rows`): the one pool
    `[H, N, R, W]` of `split_pages`, copied a page in those parts (each a 4-D pool of its own in the result).
    `row_loads` (> 0: the stored pools, one f16 vector a page a row pool): the row pools are not copied with TMA but
    loaded from global memory straight into registers, `row_loads` pages ahead of the step that reads them.
    `block_rows` (> 0: `kv_parts`' blocks `[H, N, P + r, W]`): each block copied a page in two parts, its first
    `block_rows` rows (the code tile) and the rest as one vector of words (read back 64 words at a time: the OR of
    those `[B, H, S, 64]`)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, m = page_table.shape
    h, _, p = stores[0].shape[:3]
    if m % splits:
        raise ValueError(f"pages per sequence {m} must be a multiple of --splits {splits}")
    if joined and any(x.ndim != 4 for x in stores):
        raise ValueError(f"joined: expected [H, N, R, C] pools of join_pages, got {[x.shape for x in stores]}")
    per_split = m // splits
    firsts, inputs = None, stores
    if block_rows:
        if any(x.ndim != 4 or x.shape[2] <= block_rows for x in stores):
            raise ValueError(f"block_rows: expected [H, N, R, W] blocks of more than {block_rows} rows")
        split, firsts, blocks = [], [], []  # the kernel's inputs; the blocks a page copies of them
        for x in stores:
            rest = (x.shape[2] - block_rows) * x.shape[3]  # the rows' words, after the code tile's
            if (block_rows * x.shape[3]) % rest or rest % 64:
                raise ValueError(f"block_rows: {rest} words of rows after a {block_rows}-row tile of {x.shape}")
            split += [x, x.reshape(*x.shape[:2], -1)]  # the same bytes as a vector of words a page (no copy in jit)
            firsts += [0, block_rows * x.shape[3] // rest]
            blocks += [
                jax.ShapeDtypeStruct((*x.shape[:2], block_rows, x.shape[3]), x.dtype),
                jax.ShapeDtypeStruct((*x.shape[:2], rest), x.dtype),
            ]
        inputs, stores = split, blocks
        p = 64  # the row vectors are read 64 words at a time
    pool = stores[0]
    if parts is not None:
        if len(stores) != 1 or pool.ndim != 4 or any(first % rows for first, rows in parts):
            raise ValueError(f"parts {parts}: expected one [H, N, R, W] pool and parts at multiples of their rows")
        stores = [jax.ShapeDtypeStruct((*pool.shape[:2], rows, pool.shape[3]), pool.dtype) for _, rows in parts]
        inputs = [pool]
    if firsts is None:
        firsts = [0] * len(stores) if parts is None else [first // rows for first, rows in parts]  # in blocks
    codes = [len(x.shape) == 4 for x in stores]
    wide_rows = any(not c and x.shape[2] != p for x, c in zip(stores, codes, strict=True))
    if row_loads and (joined or parts is not None or block_rows or wide_rows):
        raise ValueError("row_loads: expected the stored pools (one vector a page a row pool)")
    regions = [read_regions(x.shape, joined) if c else None for x, c in zip(stores, codes, strict=True)]
    out_types = []
    for x, is_codes, reg in zip(stores, codes, regions, strict=True):
        if is_codes:
            out_types += [jax.ShapeDtypeStruct((b, h, splits, rows, x.shape[3]), x.dtype) for _, rows in reg]
        else:  # a row pool's sum (f16 rows) or OR (words)
            words = x.dtype == jnp.uint32
            out_types.append(jax.ShapeDtypeStruct((b, h, splits, p), jnp.uint32 if words else jnp.float32))

    def kernel(table_ref, *refs):
        n_in = len(inputs)
        in_refs, out_refs = refs[:n_in], refs[n_in:]
        if parts is not None:  # the one pool, once a part
            in_refs = in_refs * len(parts)
        si, hi, bi = (jax.lax.axis_index(n) for n in ("split", "head", "batch"))

        def spec(x, is_codes, first):
            def index(i):
                page = table_ref[bi, si * per_split + i]
                return (hi, page, first, 0) if is_codes else (hi, page, first)

            if not is_codes:  # one copy of a page's k vectors (`block_rows`: a block's words after its code tile)
                return plgpu.BlockSpec((None, None, x.shape[2]), index)
            if joined or x.shape[2] % 64:  # one copy of a whole page, or a part of rows that is not MMA tiles:
                # unswizzled, read back strided
                return plgpu.BlockSpec((None, None, *x.shape[2:]), index)
            # rows of 128 bytes or more are swizzled, as TMA lays out MMA operands: read back in the MMA tile layout
            # they have no conflict-free plan unswizzled (Mosaic GPU refuses them); narrower rows timed the same
            # either way (BENCHMARKS.md) and stay plain
            if 4 * x.shape[3] < 128:
                return plgpu.BlockSpec((None, None, *x.shape[2:]), index)
            tf = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
            return plgpu.BlockSpec((None, None, *x.shape[2:]), index, transforms=tf)

        # read as an attention kernel over [tokens, *] tiles would: codes in the warpgroup MMA's tile layout, scales
        # one per row of it
        row = plgpu.Layout.WGMMA.reduce(1)

        def tile_of(x, rows):  # a block of R rows that is not whole MMA tiles (64 rows): each thread reads every
            # 128th vector of up to 4 words (128-bit loads where R allows), conflict-free in shared memory
            if not joined and x.shape[2] % 64 == 0:
                return plgpu.Layout.WGMMA
            words = rows * x.shape[3]
            vec = next((v for v in (4, 2, 1) if words % (128 * v) == 0), None)
            if vec is None:
                raise ValueError(
                    f"a block of {(rows, x.shape[3])} words is not a multiple of the warpgroup's 128 threads"
                )
            return plgpu.Layout.WG_STRIDED((rows, x.shape[3]), vec_size=vec)

        tiles = [
            [tile_of(x, rows) for _, rows in reg] if c else None
            for x, c, reg in zip(stores, codes, regions, strict=True)
        ]
        init = []
        for x, c, t, reg in zip(stores, codes, tiles, regions, strict=True):
            if c:
                init += [
                    plgpu.layout_cast(jnp.zeros((rows, x.shape[3]), x.dtype), tr)
                    for (_, rows), tr in zip(reg, t, strict=True)
                ]
            else:
                words = x.dtype == jnp.uint32
                init.append(plgpu.layout_cast(jnp.zeros((p,), jnp.uint32 if words else jnp.float32), row))
        init = tuple(init)

        piped = [c or not row_loads for c in codes]  # pools the TMA pipeline copies
        row_refs = [r for r, q in zip(in_refs, piped, strict=True) if not q]

        def rows_at(j):  # with `row_loads`: page j's row vectors from global memory (a split's last, past its end)
            page = table_ref[bi, si * per_split + jnp.minimum(j, per_split - 1)]
            return tuple(plgpu.load(r.at[hi, page], (), layout=row, optimized=False) for r in row_refs)

        def body(idx, *args):
            smem, (carry, queue) = args[:-1], args[-1]
            smem, loaded = iter(smem), iter(queue[0] if row_loads else ())  # this page's row vectors, loaded ahead
            carry, new = iter(carry), []
            for c, t, q, reg in zip(codes, tiles, piped, regions, strict=True):
                if c:
                    s = next(smem)
                    for (first, rows), tr in zip(reg, t, strict=True):
                        whole = first == 0 and rows == s.shape[0]
                        new.append(next(carry) | plgpu.load(s if whole else s.at[pl.ds(first, rows)], layout=tr))
                    continue
                acc = next(carry)
                if not q:  # this page's vector, loaded row_loads steps ago
                    new.append(acc + next(loaded).astype(jnp.float32))
                    continue
                s = next(smem)
                for j in range(s.shape[0] // p):  # a row pool's vectors, each one per row of the tile
                    v = plgpu.load(s.at[pl.ds(j * p, p)], layout=row)
                    acc = acc | v if v.dtype == jnp.uint32 else acc + v.astype(jnp.float32)
                new.append(acc)
            if row_loads:
                queue = (*queue[1:], rows_at(idx[0] + row_loads))
            return tuple(new), queue

        pipe = plgpu.emit_pipeline(
            body,
            grid=(per_split,),
            in_specs=[spec(x, c, f) for x, c, f, q in zip(stores, codes, firsts, piped, strict=True) if q],
            max_concurrent_steps=stages,
            init_carry=(init, tuple(rows_at(j) for j in range(row_loads))),
        )
        final, _ = pipe(*[r for r, q in zip(in_refs, piped, strict=True) if q])
        for o, v in zip(out_refs, final, strict=True):
            o[bi, hi, si] = v

    f = plgpu.kernel(
        kernel,
        out_type=tuple(out_types),
        grid=(splits, h, b),
        grid_names=("split", "head", "batch"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )
    return f(page_table, *inputs)


def reference(stores, page_table, splits: int):
    """numpy: the same ORs and sums."""
    b, m = page_table.shape
    tab = np.asarray(page_table).reshape(b, splits, m // splits)
    outs = []
    for x in stores:
        a = np.asarray(x)
        g = a[:, tab]  # [H, B, S, per_split, P, ...]
        g = np.moveaxis(g, 0, 2)  # [B, S, H, per_split, P, ...]
        g = np.swapaxes(g, 1, 2)  # [B, H, S, per_split, P, ...]
        if a.ndim == 4:
            outs.append(np.bitwise_or.reduce(g, axis=3))
        elif a.dtype == np.uint32:  # [..., per_split, words]: a block's row words (`block_rows`), 64 at a time, OR-ed
            outs.append(np.bitwise_or.reduce(g.reshape(*g.shape[:-1], -1, 64), axis=(3, 4)))
        else:  # [..., per_split, k*P]: the k vectors and the pages summed
            p = stores[0].shape[2]
            outs.append(g.reshape(*g.shape[:-1], -1, p).astype(np.float64).sum(axis=(3, 4)))
    return outs


def pools(config: str, pages: int, page: int, key, paired: bool = False):
    """The K and V pools of a per-token config, as benchmarks/attention.py makes them: codes as words, scale/zero
    rows squeezed. `paired`: each page's scale and zero-point rows side by side in one `[H, N, 2P]` pool (one copy
    a page where the stored layout takes two): the layout `--layouts paired` times."""
    k_spec, v_spec = bench.spec_pair(config)
    out = []
    for i, spec in enumerate((k_spec, v_spec)):
        c, s, z = bench.make_store(jax.random.fold_in(key, i), spec, pages, page)
        rows = [_squeeze_page(x) for x in (s, z) if x is not None]
        if paired and len(rows) == 2:
            rows = [jnp.concatenate(rows, axis=2)]
        out += [as_words(c)] + rows
    return out


JOIN_WIDTH = 128  # words a row of a joined block (512 bytes, < TMA's 256-element box): a warpgroup's 128 threads
# then read whole rows, one word each, which the strided register layout needs (R * C a multiple of 128)


def join_pages(stores, width: int = JOIN_WIDTH):
    """`pools()`'s stored pools of one config as one pool of uint32 words `[H, N, R, width]`: page n of head h is one
    block holding, in order, K codes, K scale row, K zero row, V codes, V scale row, V zero row (whichever the config
    has), zero-padded to a whole number of rows. The same bytes as `stores`, plus the padding."""
    h, n = stores[0].shape[:2]
    parts = []
    for x in stores:
        flat = x.reshape(h, n, 1, -1)  # a page's values, in the order the pool holds them
        if flat.dtype != jnp.uint32:  # f16 rows: two values a word (a page's row has an even number of tokens)
            if flat.shape[3] % (4 // flat.dtype.itemsize):
                raise ValueError(f"a page's row of {flat.shape[3]} {flat.dtype} values is not whole 32-bit words")
            flat = as_words(flat)
        parts.append(flat.reshape(h, n, -1))
    block = jnp.concatenate(parts, axis=2)  # [H, N, words]
    pad = -block.shape[2] % width
    block = jnp.pad(block, ((0, 0), (0, 0), (0, pad)))
    return block.reshape(h, n, -1, width)  # [H, N, R, C]


def split_pages(stores):
    """`pools()`'s stored pools of one config as one pool of uint32 words `[H, N, 2P + R, W]` (W: a code row's words,
    the same for K and V): page n of head h is one block of K's P code rows, V's P code rows, then the scale and
    zero-point rows' words in R rows of W (zero-padded). Copied in those three parts (`parts_of`), so that the code
    tiles keep their own copies and swizzle: contiguous pages with half the copies of the stored layout."""
    kc, vc = stores[0], next(x for x in stores[1:] if x.ndim == 4)
    if kc.shape[3] != vc.shape[3]:
        raise ValueError(f"parts: K's code rows ({kc.shape[3]} words) and V's ({vc.shape[3]}) must be as wide")
    h, n, p, w = kc.shape
    rows = [x for x in stores if x.ndim != 4]
    if not rows:
        return jnp.concatenate([kc, vc], axis=2)
    tail = join_pages(rows, width=w)  # [H, N, R, W]
    if (2 * p) % tail.shape[2]:
        raise ValueError(f"parts: {tail.shape[2]} rows of scales do not start at a multiple of their count")
    return jnp.concatenate([kc, vc, tail], axis=2)


def parts_of(pool, page: int):
    """`split_pages`'s copies a page: (first row, rows) of K's codes, V's, and the scale rows if any."""
    r = pool.shape[2] - 2 * page
    return ((0, page), (page, page)) + (((2 * page, r),) if r else ())


KV_WIDTH = 64  # words a row of a `kvblocks` block (256 bytes): every K or V page of the per-token configs is whole
# rows of it (codes 256 x bits words, each f16 row 32 words), so its blocks need no padding


def kv_blocks(stores, width: int = KV_WIDTH):
    """`pools()`'s stored pools as two pools of uint32 words `[H, N, R, width]`: K's page (codes, scale row, zero-point
    row) one block, V's another (`join_pages` of each side): two copies a page, K and V kept apart as the cache keeps
    them."""
    second = next(i for i, x in enumerate(stores) if i and x.ndim == 4)  # V's codes
    return [join_pages(stores[:second], width), join_pages(stores[second:], width)]


def kv_parts(stores):
    """`kv_blocks` with rows as wide as a code row (`[H, N, P + r, W]`, W a code row's words): each block's code tile
    and its scale and zero-point rows can be copied apart (`--layouts kvparts`, four copies a page, each pool's page
    contiguous), so that the code tile keeps a copy of its own, as an attention kernel's MMA tiles want."""
    second = next(i for i, x in enumerate(stores) if i and x.ndim == 4)
    return [join_pages(side, width=side[0].shape[3]) for side in (stores[:second], stores[second:])]


LAYOUTS = ("stored", "paired", "joined", "kvblocks", "kvparts", "parts", "rowloads")
ROW_LOADS_AHEAD = 2  # `rowloads`: pages ahead of its step that a page's scale rows are loaded


def layout_pools(config: str, pages: int, page: int, key, layout: str):
    """The pools `--layouts <layout>` streams, all from the same stored pools."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    stores = pools(config, pages, page, key, paired=layout == "paired")
    if layout == "joined":
        return [join_pages(stores)]
    if layout == "kvblocks":
        return kv_blocks(stores)
    if layout == "kvparts":
        return kv_parts(stores)
    return [split_pages(stores)] if layout == "parts" else stores


def stream_kw(stores, layout: str, page: int) -> dict:
    """`stream_pages`' keywords for `layout_pools`' pools."""
    if layout == "parts":
        return dict(parts=parts_of(stores[0], page))
    if layout == "rowloads":
        return dict(row_loads=ROW_LOADS_AHEAD)
    if layout == "kvparts":
        return dict(block_rows=page)
    return dict(joined=layout in ("joined", "kvblocks"))


def views(stores, kw):
    """The pools as `stream_pages` returns one result each: `parts` as slices of the one pool, a joined block read
    in two regions (`read_regions`) as its two slices."""
    if kw.get("parts") is not None:
        return [stores[0][:, :, first : first + rows] for first, rows in kw["parts"]]
    if kw.get("block_rows"):
        n = kw["block_rows"]
        return [v for x in stores for v in (x[:, :, :n], x[:, :, n:].reshape(*x.shape[:2], -1))]
    out = []
    for x in stores:
        regions = read_regions(x.shape, kw.get("joined", False)) if x.ndim == 4 else [(0, None)]
        out += [x if rows is None or rows == x.shape[2] else x[:, :, first : first + rows] for first, rows in regions]
    return out


def check(config: str, splits: int, stages: int, page: int, interpret: bool, layout: str = "stored") -> float:
    """Largest relative error of the sums (the ORs must be equal) at a small shape; raises on a mismatch."""
    key = jax.random.key(3)
    b, m = 2, 4 * splits
    stores = layout_pools(config, b * m + 3, page, key, layout)
    table = jax.random.permutation(jax.random.fold_in(key, 9), b * m + 3)[: b * m].reshape(b, m).astype(jnp.int32)
    kw = stream_kw(stores, layout, page)
    got = stream_pages(stores, table, splits=splits, stages=stages, interpret=interpret, **kw)
    worst = 0.0
    for g, r in zip(got, reference(views(stores, kw), table, splits), strict=True):
        g = np.asarray(g)
        if r.dtype == np.float64:
            worst = max(worst, float(np.max(np.abs(g - r) / np.maximum(np.abs(r), 1e-3))))
        elif not np.array_equal(g, r):
            raise AssertionError(f"{config}: streamed bytes differ from numpy in {int(np.sum(g != r))} places")
    if worst > 1e-5:
        raise AssertionError(f"{config}: sums off by {worst:.2e} relative")
    return worst


def _pool_copies(config: str, b: int, context: int, page: int, max_copies: int) -> int:
    """How many copies of the pools, each with its own page table, the timing rotates through so that they are ~3x
    L2 (from the bytes a call of the stored layout reads: codes, scales and zeros of K and V and the page table)."""
    k_spec, v_spec = bench.spec_pair(config)
    per_tok = bench.store_bytes_per_token(k_spec, page) + bench.store_bytes_per_token(v_spec, page)
    nbytes = b * context * per_tok + b * (context // page) * 4
    return max(1, min(max_copies, math.ceil(3 * bench.L2_BYTES / nbytes)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--configs", default="4/4,2/2,8/8,16/16")
    ap.add_argument("--splits", default="4", help="comma-separated splits per sequence to time")
    ap.add_argument("--stages", default="4", help="comma-separated TMA ring depths to time")
    ap.add_argument(
        "--layouts",
        default="stored",
        help="comma-separated, any of: `stored` (scales and zero-points in rows of their own, as the cache keeps "
        "them), `paired` (each page's scale and zero-point rows side by side, one copy for both), `joined` (each "
        "page of a KV head one block: K and V codes and rows, one copy a page), `kvblocks` (K's page one block of its "
        "codes and rows, V's another: two copies a page), `kvparts` (the same blocks, each copied as its code tile "
        "and its rows: four copies a page), `parts` (the same contiguous page as "
        "K's code rows, V's, then the scale rows: three copies a page, the code tiles swizzled as stored), `rowloads` "
        "(stored; the codes' two copies a page with TMA, the four scale rows loaded into registers two pages ahead)",
    )
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-copies", type=int, default=8)
    ap.add_argument("--no-triton", action="store_true", help="skip timing the Triton attention kernel beside it")
    ap.add_argument("--no-jax", action="store_true", help="skip timing JAX's bf16 Pallas paged attention")
    ap.add_argument("--jax-page", type=int, default=16, help="page size of JAX's bf16 kernel")
    ap.add_argument("--jax-grid", default="8:32", help="JAX kernel settings tried: pages_per_compute_block:k_splits")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument(
        "--interpret", action="store_true", help="GPU interpret mode on the CPU (tests; times mean nothing)"
    )
    args = ap.parse_args(argv)
    layouts = args.layouts.split(",")
    split_counts = [int(x) for x in args.splits.split(",")]
    depths = [int(x) for x in args.stages.split(",")]
    if set(layouts) - set(LAYOUTS):
        raise SystemExit(f"--layouts {args.layouts}: expected some of {', '.join(LAYOUTS)}")

    b, pps = args.batch, args.context // args.page
    bw = bench.copy_bandwidth(nbytes=2**20 if args.interpret else 2 * 2**30)
    best_bw = max(v for k, v in bw.items() if not k.endswith("error"))
    print(f"device: {jax.devices()[0].device_kind}; bandwidth {best_bw / 1e12:.3f} TB/s ({bw})", flush=True)

    def add_pcts(row):  # a timed row's fraction of the bandwidth
        row.update(pct_bw=100 * row["bytes"] / row["time_s"] / best_bw)

    rows = []
    jax_s = None
    if not args.no_jax:  # the baseline, timed in this run: every row's x JAX is against it
        r = bench.bench_jax_bf16(b, args.context, args.jax_page, _bench_args(args))
        jax_s = r.get("time_s")
        rows.append(dict(config="16/16", kernel="JAX bf16 paged attention", batch=b, context=args.context, **r))
        if jax_s:
            add_pcts(rows[-1])
        print(json.dumps(rows[-1]), flush=True)
    for config in args.configs.split(","):
        k_spec, v_spec = bench.spec_pair(config)
        copies = _pool_copies(config, b, args.context, args.page, args.max_copies)
        key = jax.random.key(b * 7919 + args.context)
        tables = bench.page_tables(jax.random.fold_in(key, 3), b, pps, copies)
        for layout in layouts:
            stores = layout_pools(config, copies * b * pps, args.page, key, layout)
            # bytes a call reads: its pages of every pool (joined's padding included: TMA copies it too) and the
            # page table
            nbytes = b * pps * sum(x.nbytes // x.shape[1] for x in stores) + b * pps * 4
            # what the probe writes (an OR or sum per split) counts as bytes moved too: per split, a codes pool's OR
            # is its page's words (each region read back, `views`) and a row pool's sum one float32 a token, for
            # every head
            kw = stream_kw(stores, layout, args.page)
            per_split = sum(
                4 * (math.prod(x.shape[2:]) if x.ndim == 4 else args.page) * x.shape[0] for x in views(stores, kw)
            )
            for splits, stages in itertools.product(split_counts, depths):
                written = b * splits * per_split
                row = dict(config=config, layout=layout, batch=b, context=args.context, splits=splits, stages=stages)
                row.update(bytes_read=nbytes, bytes_written=written, bytes=nbytes + written)
                try:
                    row["check_rel_err"] = check(config, splits, stages, args.page, args.interpret, layout)
                    fn = functools.partial(stream_pages, splits=splits, stages=stages, interpret=args.interpret, **kw)
                    t = bench.timed(fn, stores, [(tables[i],) for i in range(copies)], args.reps, args.trials)
                    row.update(time_s=t, gbps=row["bytes"] / t / 1e9)
                    add_pcts(row)
                except Exception as e:  # a depth that does not fit shared memory: record it, keep going
                    row["error"] = repr(e)[:400]
                print(json.dumps(row), flush=True)
                rows.append(row)
            del stores
        if not args.no_triton:
            r = bench.bench_ours(b, args.context, k_spec, v_spec, args.page, {}, _bench_args(args))
            row = dict(config=config, kernel="triton attention (default tuning)", batch=b, context=args.context, **r)
            if "time_s" in r:
                add_pcts(row)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for r in rows:
        if jax_s and "time_s" in r:
            r["x_jax"] = jax_s / r["time_s"]
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(copy_bandwidth=bw, rows=rows), indent=1))
    print(f"\n{'config':8} {'kernel':34} {'ms':>8} {'% bw':>6} {'x JAX':>6}")
    for r in rows:
        name = r.get("kernel") or f"TMA stream, {r['layout']}, {r['splits']} splits, {r['stages']} st"
        ms = f"{r['time_s'] * 1e3:.3f}" if "time_s" in r else "-"
        pct = f"{r['pct_bw']:.1f}" if "pct_bw" in r else r.get("error", r.get("skipped", ""))[:60]
        xj = f"{r['x_jax']:.2f}" if "x_jax" in r else ""
        print(f"{r['config']:8} {name:34} {ms:>8} {pct:>6} {xj:>6}")


def _bench_args(args):
    """The namespace benchmarks/attention.py's timing helpers read: its own defaults, with this run's settings."""
    ns = bench.parser().parse_args([])
    for name in ("max_copies", "reps", "trials", "jax_grid", "jax_page"):
        setattr(ns, name, getattr(args, name))
    return ns


if __name__ == "__main__":
    main()
