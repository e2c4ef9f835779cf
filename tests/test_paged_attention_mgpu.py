"""The experimental Mosaic GPU decode kernel (`pallas_kernels/paged_attention_mgpu.py`) against the pure-jnp reference,
run by Mosaic GPU's interpreter on the CPU (TMA copies, barriers and MMAs simulated; the key operand goes through shared
memory there, in registers when compiled), on fresh random pages; its lowering for CUDA; and the inputs it refuses.

Set KVTUNER_TEST_COMPILED=1 on a Hopper GPU to run the same checks compiled."""

from __future__ import annotations

import os

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kvtuner_jax.specs import KVSpec
from pallas_kernels import paged_attention_mgpu as mg
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.quantize_write import quantize_pages

COMPILED = os.environ.get("KVTUNER_TEST_COMPILED") == "1"
PAGE = 64


def _case(
    kb, vb, *, b=3, h=2, group=4, d=128, pages=4, symmetric=False, lengths=None, seed=0, ks=None, vs=None, page=PAGE
):
    key = jax.random.key(seed)
    ks = ks or KVSpec(bits=kb, axis="token", group_size=d, symmetric=symmetric)
    vs = vs or KVSpec(bits=vb, axis="token", group_size=d, symmetric=symmetric)
    n = b * pages + 2
    k = quantize_pages(jax.random.normal(jax.random.fold_in(key, 1), (h, n, page, d)) * 1.5, ks)
    v = quantize_pages(jax.random.normal(jax.random.fold_in(key, 2), (h, n, page, d)), vs)
    table = jax.random.permutation(jax.random.fold_in(key, 3), n)[: b * pages].reshape(b, pages).astype(jnp.int32)
    lengths = jnp.asarray(lengths if lengths is not None else [pages * page, page, 0][:b], jnp.int32)
    # entries past a sequence's pages are -1, as the engine leaves them
    table = jnp.where(jnp.arange(pages)[None] < (-(-lengths // page))[:, None], table, -1)
    q = jax.random.normal(jax.random.fold_in(key, 4), (b, h * group, 1, d), jnp.float32).astype(jnp.bfloat16)
    return (q, *k, *v, table, lengths), dict(k_spec=ks, v_spec=vs, sm_scale=d**-0.5)


def _kernel_results(monkeypatch) -> list:
    """Records (the kernel call's keyword arguments, its results (o, m, l, redone)) for each `_call`."""
    seen, real = [], mg._call

    def call(*a, **kw):
        res = real(*a, **kw)
        seen.append((kw, res))
        return res

    monkeypatch.setattr(mg, "_call", call)
    return seen


def _loud_later_pages(args, kw, mags=(0.05, 5.0), seed=9):
    """The case `args` with its keys re-drawn: a sequence's first page quiet (x mags[0]) and its others loud (x
    mags[1]), so that scores rise far above the fixed reference (each split's first-page maximum)."""
    h, n, page, d = args[1].shape[0], args[1].shape[1], args[1].shape[2], args[0].shape[-1]
    first = jnp.zeros((n,), bool).at[args[7][:, 0]].set(True)  # the physical pages that are a sequence's first
    mag = jnp.where(first, *mags)[None, :, None, None]
    k = quantize_pages(jax.random.normal(jax.random.key(seed), (h, n, page, d)) * mag, kw["k_spec"])
    return (args[0], *k, *args[4:])


# relative error of the output (largest element error over the largest element): ~16-bit operand terms at "high"
# (measured 5e-6 to 7e-6); bf16 operands at "bf16" (2^-9 each, measured 4e-3 to 7e-3)
TOL = {"high": 1e-4, "bf16": 2e-2}


def _check_against_reference(args, kw, precision="high", **opts):
    """The kernel (interpreted, or compiled with KVTUNER_TEST_COMPILED=1) against the float64-precision reference:
    the output within TOL of its largest element, lse -inf exactly where a sequence has no pages (and the output 0
    there), lse close elsewhere."""
    with jax.default_matmul_precision("highest"):
        want, want_lse = paged_attention_reference(*args, **kw)
    got, lse = mg.paged_attention(*args, **kw, precision=precision, interpret=not COMPILED, **opts)
    got, lse, want, want_lse = map(np.asarray, (got, lse, want, want_lse))
    assert got.shape == want.shape and lse.shape == want_lse.shape
    assert np.max(np.abs(got - want)) <= TOL[precision] * np.max(np.abs(want))
    seen = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), seen)  # -inf exactly where a sequence has no pages
    assert np.all(got[~seen] == 0)
    np.testing.assert_allclose(lse[seen], want_lse[seen], atol=50 * TOL[precision])


@pytest.mark.parametrize(
    "kb,vb,extra",
    [
        (4, 4, {}),
        (2, 2, {"group": 1, "seed": 1}),
        (4, 2, {"symmetric": True, "seed": 2}),
        (2, 4, {"group": 8, "d": 64, "seed": 3}),
    ],
)
@pytest.mark.parametrize("precision", ["high", "bf16"])
def test_matches_reference(kb, vb, extra, precision):
    args, kw = _case(kb, vb, **extra)
    # the element-wise unpacking (`word_unpack=False`) where the layout is the odd one out
    plain = dict(word_unpack=False) if extra.get("symmetric") else {}
    _check_against_reference(args, kw, precision, num_splits=2, **plain)


@pytest.mark.parametrize(
    "bits,d,f16",
    [(4, 128, False), (2, 128, False), (4, 64, True), (2, 64, False), (2, 128, True), (8, 128, True), (8, 64, True)],
)
def test_word_unpack_columns(bits, d, f16):
    """A page's codes unpacked four bytes a register (`_operand_words`; compiled, the register-level
    `_operand_words_mgpu`) into MMA operand columns: column i holds the code of head dim perm[i] (times 2^(bits x
    field[i]) for f16 operands), checked element by element against numpy on random code bytes."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    nbytes = d * bits // 8
    codes = np.random.default_rng(bits * d + f16).integers(0, 256, (PAGE, nbytes), dtype=np.uint8)
    dt = jnp.float16 if f16 else jnp.bfloat16

    def kernel(c_ref, o_ref, c_smem, bar):
        plgpu.copy_gmem_to_smem(c_ref, c_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        unpack = mg._operand_words_mgpu if COMPILED else mg._operand_words
        o_ref[...] = unpack(plgpu.load(c_smem, layout=plgpu.Layout.WGMMA_8BIT), bits, f16)

    swz = min(128, nbytes)
    tf = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz)) if swz >= 32 else ()
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((PAGE, d), dt),
        scratch_types=[plgpu.SMEM((PAGE, nbytes), jnp.uint8, transforms=tf), plgpu.Barrier(num_barriers=1)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **({} if COMPILED else {"interpret": plgpu.InterpretGPUParams()}),
    )
    got = np.asarray(f(jnp.asarray(codes)).astype(jnp.float32))
    perm, field = (np.asarray(x) for x in mg.field_permutation(d, bits, words=True))
    assert sorted(perm) == list(range(d))
    per = 8 // bits
    dims = (codes[:, :, None] >> (bits * np.arange(per))) & ((1 << bits) - 1)  # [rows, bytes, field]
    want = dims.reshape(PAGE, d)[:, perm] * (2.0 ** (bits * field) if f16 else 1.0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "bits,d,page,npages",
    [(4, 128, 64, 1), (2, 128, 64, 1), (8, 128, 64, 1), (4, 64, 64, 1), (8, 64, 64, 1), (4, 128, 16, 4),
     (2, 128, 32, 2), (8, 128, 128, 1), (4, 128, 64, 2), (4, 64, 32, 4)],
)  # fmt: skip
def test_value_regs_load_v_transposed(bits, d, page, npages):
    """`value_regs`'s plan, simulated lane by lane in numpy: code rows written into page slots where TMA's swizzle puts
    them (byte address a of a row-major slot at a ^ ((a >> 7) mod S/16) << 4, S = min(128, row bytes)); each lane's
    `ldmatrix.x4.trans` row addresses from `_vregs_address`, the instruction emulated (lane (g, q) of matrix m gets
    16-bit word g of rows 2q and 2q + 1, the lower one in the low half); each register unpacked as
    `_vregs_sources` says into the MMA layout's places (row 64 mt + 16 w + 8 h + g, tokens 8 kt + 2q + e). The result
    must be V^T with row i the codes of head dim `value_rows(...)[0][i]`, and so must the jnp form the interpreter
    runs (`_value_operand`). The compiled builder (`_value_operand_mgpu`) follows the same plan; the compiled tests
    check it on the GPU."""
    rng = np.random.default_rng(bits * d + page)
    row_bytes, rows = d * bits // 8, page * npages
    swz, per, mask = min(128, row_bytes), 8 // bits, (1 << bits) - 1
    codes = rng.integers(0, 256, (rows, row_bytes), dtype=np.uint8)
    slots = np.zeros((npages, page * row_bytes), np.uint8)
    for t in range(rows):
        a = (t % page) * row_bytes + np.arange(row_bytes)
        slots[t // page, a ^ (((a >> 7) % (swz // 16)) << 4)] = codes[t]
    instrs = mg._vregs_matrices(d, bits, rows)
    sources = mg._vregs_sources(d, bits)
    got = np.full((d, rows), -1)
    for w in range(4):
        regs = [{} for _ in range(32)]
        for n, mats in enumerate(instrs):
            rows_at = [mg._vregs_address(lane, w, n, head_dim=d, bits=bits, page=page) for lane in range(32)]
            for m, mat in enumerate(mats):
                for lane in range(32):
                    g, q = lane // 4, lane % 4
                    words = []
                    for r in (2 * q, 2 * q + 1):
                        pg, off = rows_at[8 * m + r]
                        lo, hi = slots[pg, off + 2 * g : off + 2 * g + 2]
                        words.append(int(lo) | int(hi) << 8)
                    regs[lane][mat] = words[0] | words[1] << 16
        for lane in range(32):
            g, q = lane // 4, lane % 4
            for mt in range(d // 64):
                for kt in range(rows // 8):
                    for h in range(2):
                        u, e, j = sources[2 * mt + h]
                        e = w % 2 if e is None else e
                        f = regs[lane][(kt, u)] >> (bits * j)
                        for half in range(2):
                            got[64 * mt + 16 * w + 8 * h + g, 8 * kt + 2 * q + half] = (
                                f >> (8 * (e + 2 * half))
                            ) & mask
    perm, field = (np.asarray(x) for x in mg.value_rows(d, bits))
    assert sorted(perm) == list(range(d))
    np.testing.assert_array_equal(field, perm % per)
    natural = ((codes[:, :, None] >> (bits * np.arange(per))) & mask).reshape(rows, d)  # dim = byte x per + field
    np.testing.assert_array_equal(got, natural[:, perm].T)
    jnp_form = mg._value_operand(jnp.asarray(codes), bits, d, bits == 8)
    np.testing.assert_array_equal(np.asarray(jnp_form.astype(jnp.float32)), natural[:, perm].T)


@pytest.mark.parametrize("kb,vb,extra", [(4, 4, {"seed": 6}), (2, 4, {"symmetric": True, "group": 3, "seed": 7})])
def test_running_softmax_matches_reference(kb, vb, extra):
    """The online-softmax kernel (the fixed one's redo) on its own."""
    args, kw = _case(kb, vb, lengths=[4 * PAGE, PAGE + 17, 0], **extra)
    with jax.default_matmul_precision("highest"):
        want, want_lse = paged_attention_reference(*args, **kw)
    got, lse = mg.paged_attention(*args, **kw, softmax="running", num_splits=2, interpret=not COMPILED)
    got, lse, want, want_lse = map(np.asarray, (got, lse, want, want_lse))
    assert np.max(np.abs(got - want)) <= TOL["high"] * np.max(np.abs(want))
    seen = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[seen], want_lse[seen], atol=50 * TOL["high"])
    assert np.all(np.isneginf(lse[~seen]))


@pytest.mark.parametrize(
    "kb,vb,extra,precision",
    [(4, 4, {"seed": 10}, "high"), (2, 4, {"symmetric": True, "group": 8, "d": 64, "seed": 11}, "bf16")],
)
def test_f16_keys_match_reference(kb, vb, extra, precision):
    """Keys as f16 operands (fields masked in place, their powers of two and a per-row gain folded into q)."""
    args, kw = _case(kb, vb, **extra)
    with jax.default_matmul_precision("highest"):
        want, want_lse = paged_attention_reference(*args, **kw)
    got, lse = mg.paged_attention(*args, **kw, key_f16=True, precision=precision, interpret=not COMPILED)
    got, lse, want, want_lse = map(np.asarray, (got, lse, want, want_lse))
    assert np.max(np.abs(got - want)) <= TOL[precision] * np.max(np.abs(want))
    seen = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[seen], want_lse[seen], atol=50 * TOL[precision])


@pytest.mark.parametrize(
    "kb,vb,extra,opts,precision",
    [
        (8, 8, {"seed": 14}, {}, "high"),
        (8, 8, {"symmetric": True, "group": 8, "d": 64, "seed": 15}, {"num_splits": 2, "softmax": "fixed"}, "bf16"),
        (8, 4, {"group": 3, "seed": 16}, {}, "high"),
        (2, 8, {"symmetric": True, "seed": 17}, {"word_unpack": False}, "high"),
        (4, 2, {"seed": 18}, {"value_f16": True, "softmax": "fixed"}, "high"),
    ],
)
def test_eight_bit_and_f16_values_match_reference(kb, vb, extra, opts, precision):
    """8-bit codes (a whole byte under f16 1024.0's exponent: keys and q, values and p as f16 operands; f16
    probabilities take the online softmax by default) and f16 value operands for 2-bit codes (each field comes out
    times 2^(bits x field), taken off the output's rows)."""
    _check_against_reference(*_case(kb, vb, **extra), precision, **opts)


@pytest.mark.parametrize(
    "kb,vb,extra,opts",
    [
        (4, 4, {"seed": 60, "lengths": [4 * PAGE, 2 * PAGE + 5, 3]}, {"value_regs": False}),
        (2, 2, {"seed": 61, "group": 6}, {"value_regs": False, "softmax": "running"}),
        (4, 2, {"seed": 62, "lengths": [4 * PAGE, 3 * PAGE - 9, PAGE]}, {"value_regs": True}),
        (8, 8, {"seed": 63, "d": 64, "group": 2}, {"value_regs": True}),
    ],
)
def test_value_operand_staged_or_in_registers(kb, vb, extra, opts):
    """V^T's operand either way: built as K's and staged through shared memory (`value_regs=False`), or loaded into
    the value MMA's registers (`value_regs`, the default where supported; dims in `value_rows`'s order, un-permuted
    by the wrapper), several pages a split, so that compiled the value MMA is left in flight under the next page's
    unpacking (compiled without the wait before V's unpack, the 4/4 reference case gave errors of 10x the output,
    H100 2026-12-06)."""
    _check_against_reference(*_case(kb, vb, **extra), num_splits=2, **opts)


def test_refuses_value_registers_where_not_supported():
    args, kw = _case(2, 2, d=64, b=1, pages=1)
    with pytest.raises(ValueError, match="value_regs=True: .* got head_dim 64, 2-bit values"):
        mg.paged_attention(*args, **kw, value_regs=True, interpret=True)
    args, kw = _case(4, 4, b=1, pages=1)
    with pytest.raises(ValueError, match="value_regs=True: .*value_f16=True"):
        mg.paged_attention(*args, **kw, value_regs=True, value_f16=True, interpret=True)


@pytest.mark.parametrize("kb,vb,extra", [(4, 4, {"seed": 50}), (8, 4, {"group": 5, "seed": 51})])
def test_two_score_mmas(kb, vb, extra):
    """q's two bf16 terms as two score MMAs of 8 columns into one accumulator (`one_score_mma=False`; by default
    one MMA of 16 columns whose halves are summed): the same result, fixed and online softmax alike."""
    _check_against_reference(*_case(kb, vb, **extra), one_score_mma=False, num_splits=2)


@pytest.mark.parametrize("softmax", ["fixed", "running"])
def test_two_pages_per_step(softmax):
    """Two pages stacked into one 128-row step (one chain of MMAs for both), lengths ending mid-step."""
    args, kw = _case(4, 2, lengths=[4 * PAGE, 3 * PAGE, PAGE], seed=12)
    with jax.default_matmul_precision("highest"):
        want, want_lse = paged_attention_reference(*args, **kw)
    got, lse = mg.paged_attention(
        *args, **kw, pages_per_step=2, num_splits=1, softmax=softmax, key_f16=True, interpret=not COMPILED
    )
    got, lse, want, want_lse = map(np.asarray, (got, lse, want, want_lse))
    assert np.max(np.abs(got - want)) <= TOL["high"] * np.max(np.abs(want))
    np.testing.assert_allclose(lse, want_lse, atol=50 * TOL["high"])
    # three splits of 1, 1 and 2 pages: a step's second page past its split's end belongs to the next split, and
    # is masked, not counted twice
    got3, lse3 = mg.paged_attention(*args, **kw, pages_per_step=2, num_splits=3, interpret=not COMPILED)
    assert np.max(np.abs(np.asarray(got3) - want)) <= TOL["high"] * np.max(np.abs(want))
    np.testing.assert_allclose(np.asarray(lse3), want_lse, atol=50 * TOL["high"])
    with pytest.raises(ValueError, match="pages_per_step=3"):
        mg.paged_attention(*args, **kw, pages_per_step=3)


@pytest.mark.parametrize(
    "kb,vb,page,pages,extra",
    [
        (4, 4, 32, 7, {}),  # two pages a 64-row tile, the scale rows (64 bytes) copied 128 bytes wide
        (8, 8, 32, 5, {"num_splits": 2}),  # 8-bit: f16 operands, online softmax
        (4, 2, 16, 9, {"symmetric": True, "group": 1}),  # four pages a tile, one a warp
        (2, 4, 128, 3, {"d": 64, "group": 8}),  # a page of two tiles; 2-bit keys' 16-byte rows stay unswizzled
        (8, 4, 32, 8, {"pages_per_step": 2, "num_splits": 3}),  # two tiles (four pages) a step, ragged splits
        # a page of two tiles with V's operand in registers: two `ldmatrix` plans' worth of token groups a page
        (4, 4, 128, 3, {"value_regs": True, "num_splits": 2}),
        (8, 8, 128, 3, {"value_regs": True, "d": 64, "group": 4}),
    ],
)
def test_page_sizes(kb, vb, page, pages, extra):
    """Pages of 16, 32 and 128 tokens against the reference: pages under 64 tokens share one MMA tile, each warp
    reading its rows from its own page's slot (`_load_pages_mgpu` compiled); lengths end mid-page and mid-tile."""
    opts = {k: extra.pop(k) for k in ("num_splits", "pages_per_step", "value_regs") if k in extra}
    lengths = [pages * page - 5, page + 3, 0]
    args, kw = _case(kb, vb, page=page, pages=pages, lengths=lengths, seed=20 + page + kb, **extra)
    assert args[1].shape[2] == page
    # the pool's last page first in the table: its scale rows, copied 128 bytes wide, run past the pool's end
    table, last = args[7], args[1].shape[1] - 1
    table = jnp.where(table == last, table[0, 0], table).at[0, 0].set(last)
    _check_against_reference((*args[:7], table, args[8]), kw, **opts)


@pytest.mark.parametrize(
    "kb,vb,extra,opts",
    [
        # 6 programs: the second block's last two warpgroups are spare
        (4, 2, {"seed": 30}, {"num_splits": 1, "stages": 2}),
        # pages of 32 (two a tile), ragged splits, lengths mid-page; a program of an empty sequence
        (2, 4, {"page": 32, "pages": 7, "lengths": [7 * 32 - 5, 40, 0], "seed": 31}, {"num_splits": 2, "stages": 3}),
    ],
)
def test_four_warpgroups_a_block(kb, vb, extra, opts):
    """Four programs a block (`warpgroups=4`, the block's 512 threads holding ptxas to 128 registers each), each
    warpgroup with its own page slots, barriers and staging tiles, against the reference."""
    _check_against_reference(*_case(kb, vb, **extra), warpgroups=4, **opts)


def test_refuses_blocks_over_the_shared_memory():
    """Four 8/8 programs at 3 stages need more shared memory than an SM has (with V's operand in registers too): a
    ValueError naming the block's KB and what to change, before anything is compiled; a count of programs a block it
    does not offer is named too."""
    args, kw = _case(8, 8, b=1, pages=2)
    with pytest.raises(ValueError, match=r"warpgroups=4, stages=3: a block's shared memory \(2\d\d KB\)"):
        mg.paged_attention(*args, **kw, warpgroups=4, stages=3)
    with pytest.raises(ValueError, match="warpgroups=3: expected one of"):
        mg.paged_attention(*args, **kw, warpgroups=3)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("splits,warpgroups", [(1, 1), (2, 1), (2, 4)])
def test_fixed_softmax_overflow_is_redone(monkeypatch, splits, warpgroups):
    """Keys of a sequence's later pages ~100x its first page's: scores rise far more than 127 (base 2) above the
    fixed reference, the fixed pass overflows, and its program runs the split again against the split's largest
    score: the result equals the reference. With two splits only each sequence's first split overflows (the
    second's reference is a loud page): those splits are redone, the others kept (also four programs a block, where
    a block's warpgroups redo or not each on its own)."""
    args, kw = _case(4, 4, b=2, pages=4, lengths=[4 * PAGE, 3 * PAGE], seed=8)
    args = _loud_later_pages(args, kw)
    args = (args[0] * 8, *args[1:])
    h = args[1].shape[0]
    seen = _kernel_results(monkeypatch)
    with jax.default_matmul_precision("highest"):
        want, want_lse = paged_attention_reference(*args, **kw)
    got, lse = mg.paged_attention(
        *args, **kw, num_splits=splits, warpgroups=warpgroups, stages=2, interpret=not COMPILED
    )
    # the fixed pass did overflow, in every split or (two splits) in each sequence's first only
    assert len(seen) == 1
    redone = np.asarray(seen[0][1][3]).any(axis=-1)
    np.testing.assert_array_equal(redone, np.broadcast_to(np.arange(splits) == 0, (2, h, splits)))
    assert np.all(np.asarray(seen[0][1][2])[redone] <= 4 * PAGE)  # the redone splits' sums of p: p <= 1
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - want)) <= TOL["high"] * np.max(np.abs(want))
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-5)


# the overflowing fixed pass carries inf into the interpreter's MMA, which numpy warns of (the NaN it gives is what the
# overflow check is for)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_f16_probabilities_overflow_under_a_finite_sum_of_p(monkeypatch):
    """Later pages' scores ~20-40 (base 2) above the first page's: p x the value scale passes f16's 65504 while the
    sum of p stays far under `ta.FIXED_L_LIMIT`. With f16 p forced onto the fixed softmax, only the check of o sees
    the overflow, and the split is redone: the result equals the reference. With bf16 p (the default for 4-bit
    values) nothing overflows and nothing is redone, the check reading l alone."""
    args, kw = _case(4, 4, b=2, pages=2, lengths=[2 * PAGE, 2 * PAGE], seed=12)
    args = _loud_later_pages(args, kw, mags=(0.05, 7.0), seed=13)
    seen = _kernel_results(monkeypatch)
    with jax.default_matmul_precision("highest"):
        want, _ = paged_attention_reference(*args, **kw)
    want = np.asarray(want)
    for opts, redone in ((dict(value_f16=True, softmax="fixed"), True), ({}, False)):
        seen.clear()
        got, _ = mg.paged_attention(*args, **kw, num_splits=1, interpret=not COMPILED, **opts)
        kwargs, (_, _, l, flags) = seen[0]
        assert kwargs["bounded"] == (not redone)
        assert np.asarray(flags).any() == redone  # f16 p: the check of o sees it
        if not redone:  # the fixed pass's own sums: scores far above its reference, and l alone sees nothing
            assert 2.0**20 < np.max(np.asarray(l)) < mg.ta.FIXED_L_LIMIT
        got = np.asarray(got)
        assert np.all(np.isfinite(got))
        assert np.max(np.abs(got - want)) <= TOL["high"] * np.max(np.abs(want))


@pytest.mark.skipif(COMPILED, reason="about Mosaic GPU's interpreter")
def test_interpreted_kernels_run_one_at_a_time(monkeypatch):
    """Interpreted, each kernel's results are waited for (`_settled`) before anything else is dispatched: the
    interpreter's host callbacks dispatch JAX ops of their own, and with eager ops dispatched on a kernel still in
    flight two pytest workers hung a 2-core machine (2026-12-06). The call's one kernel (its redo runs in the same
    programs) goes through it, and the result still equals the reference."""
    made, settled = [], []
    real_call, real_settled = mg._call, mg._settled
    monkeypatch.setattr(mg, "_call", lambda *a, **kw: made.append(real_call(*a, **kw)) or made[-1])
    monkeypatch.setattr(mg, "_settled", lambda r: settled.append(real_settled(r)) or settled[-1])
    args, kw = _case(4, 4, b=2, pages=2, seed=4)
    got, _ = mg.paged_attention(*args, **kw, num_splits=2, interpret=True)
    assert len(made) == 1 and [id(r) for r in settled] == [id(r) for r in made]
    assert all(x.is_ready() for r in settled for x in jax.tree.leaves(r))
    with jax.default_matmul_precision("highest"):
        want, _ = paged_attention_reference(*args, **kw)
    assert np.max(np.abs(np.asarray(got) - np.asarray(want))) <= TOL["high"] * np.max(np.abs(np.asarray(want)))


# the loud case's overflowing fixed pass carries inf into the interpreter's MMA (what its check is for)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.skipif(COMPILED, reason="about Mosaic GPU's interpreter")
@pytest.mark.parametrize(
    "warpgroups,extra,opts",
    [
        (1, {"pages": 6, "seed": 40}, {"num_splits": 1, "stages": 2}),  # each slot refilled twice
        (4, {"pages": 5, "seed": 41}, {"num_splits": 1, "stages": 2}),  # four programs' slots in one block
        # scores far above the fixed reference: each program's pipeline runs a second time, its redo
        (1, {"pages": 4, "seed": 42, "loud": True}, {"num_splits": 1, "stages": 2}),
    ],
)
def test_no_races_without_automatic_barriers(monkeypatch, warpgroups, extra, opts):
    """Without Pallas's automatic barriers (`auto_barriers=False`), Mosaic GPU's interpreter with its race detector
    finds no race between the page copies (TMA) and the program's reads of its slots, nor between a block's
    warpgroups: the refill of a slot comes after the step's last read of it, in every program, a redo's second pass
    over the pages included. The detector models a warpgroup as one thread, so what the
    kernel's own barrier orders among a warpgroup's four warps is checked compiled (`KVTUNER_TEST_COMPILED=1`),
    not here."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    made = plgpu.InterpretGPUParams
    monkeypatch.setattr(plgpu, "InterpretGPUParams", lambda **kw: made(**kw, detect_races=True))
    found, real_settled = [], mg._settled

    def settled(res):  # each kernel's result, once the detector has seen all of it
        res = real_settled(res)
        found.append(ipc.get_races().races_found)
        return res

    monkeypatch.setattr(mg, "_settled", settled)
    kernel = mg._call
    kernel.clear_cache()  # traced anew, with the detector
    loud = extra.pop("loud", False)
    args, kw = _case(4, 2, b=2, lengths=[extra["pages"] * PAGE - 3, 2 * PAGE], **extra)
    if loud:
        args = _loud_later_pages(args, kw)
        args = (args[0] * 8, *args[1:])
    seen = _kernel_results(monkeypatch)
    try:
        mg.paged_attention(*args, **kw, warpgroups=warpgroups, auto_barriers=False, interpret=True, **opts)
    finally:
        kernel.clear_cache()
    assert found == [False]
    assert np.asarray(seen[0][1][3]).any() == loud  # the programs did redo their splits


@pytest.mark.parametrize("unroll", [mg.UNROLL_COMBINE, 1])
def test_splits_combine_exactly(monkeypatch, unroll):
    """One split or four give the same result (up to float32 rounding): the flash-decoding combine is exact, written
    split by split (up to UNROLL_COMBINE splits) or as reductions over the splits (past it)."""
    monkeypatch.setattr(mg, "UNROLL_COMBINE", unroll)
    args, kw = _case(4, 4, b=2, pages=4, lengths=[4 * PAGE, 3 * PAGE], seed=5)
    one, l1 = mg.paged_attention(*args, **kw, num_splits=1, stages=2, interpret=not COMPILED)
    four, l4 = mg.paged_attention(*args, **kw, num_splits=4, stages=1, interpret=not COMPILED)
    np.testing.assert_allclose(np.asarray(one), np.asarray(four), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_combine_written_split_by_split_equals_the_reduction(splits):
    """`ta.combine_splits(..., split_by_split=True)` (the wrapper's combine for up to UNROLL_COMBINE splits) against
    a float64 numpy combine, on fresh random partials with some splits empty (m -inf, l 0) and a row with no token at
    all."""
    rng = np.random.default_rng()
    b, h, r, d = 2, 3, 4, 16
    o = rng.standard_normal((b, h, splits, r, d)).astype(np.float32) * 10
    m = rng.uniform(-20, 20, (b, h, splits, r)).astype(np.float32)
    l = rng.uniform(1, 100, (b, h, splits, r)).astype(np.float32)
    empty = rng.random((b, h, splits, r)) < 0.3
    empty[0, 1, :, 2] = True  # a query row that no split saw a token for
    m[empty], l[empty], o[empty] = -np.inf, 0.0, 0.0
    out, lse = map(
        np.asarray, mg.ta.combine_splits(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), split_by_split=True)
    )
    mx = np.max(m.astype(np.float64), axis=2, keepdims=True)
    w = np.where(np.isfinite(m), np.exp2(m - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
    lsum = np.sum(w * l, axis=2)
    want = np.sum(w[..., None] * o, axis=2) / np.where(lsum > 0, lsum, 1.0)[..., None]
    want_lse = np.where(lsum > 0, (mx[:, :, 0] + np.log2(np.where(lsum > 0, lsum, 1.0))) * np.log(2.0), -np.inf)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    assert np.array_equal(np.isneginf(lse), lsum == 0) and np.all(out[0, 1, 2] == 0)
    # lse up to ~25 in size: float32 rounding of its terms, absolute
    np.testing.assert_allclose(lse[lsum > 0], want_lse[lsum > 0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("box", [None, 4])
def test_page_table_in_shared_memory(monkeypatch, box):
    """The split's page-table slice copied to shared memory: 6 pages a split (padded to a box of 32 entries, 128
    bytes), or, with the box limit lowered to 4, as rows of 4 (the layout of slices past TMA's 256; 8 rows, 128
    bytes); equal to reading it from global memory (`table_smem=False`) and to the reference. The table's unused
    entries are -1 and out of range."""
    if box:
        monkeypatch.setattr(mg, "TABLE_BOX", box)
        monkeypatch.setattr(mg, "TABLE_COLS", box)
    args, kw = _case(4, 4, b=2, pages=6, lengths=[6 * PAGE - 5, 2 * PAGE], seed=13)
    t = mg._split_table(args[7], 1)
    assert t.shape == ((2, 1, 1, 32) if box is None else (2, 1, 8, 4))
    np.testing.assert_array_equal(np.asarray(t).reshape(2, -1)[:, :6], np.asarray(args[7]))
    with jax.default_matmul_precision("highest"):
        want, want_lse = paged_attention_reference(*args, **kw)
    got, lse = mg.paged_attention(*args, **kw, num_splits=1, stages=2, interpret=not COMPILED)
    old, old_lse = mg.paged_attention(*args, **kw, num_splits=1, stages=2, table_smem=False, interpret=not COMPILED)
    got, lse, want, want_lse = map(np.asarray, (got, lse, want, want_lse))
    assert np.max(np.abs(got - want)) <= TOL["high"] * np.max(np.abs(want))
    np.testing.assert_allclose(lse, want_lse, atol=50 * TOL["high"])
    np.testing.assert_array_equal(np.asarray(old), got)
    np.testing.assert_array_equal(np.asarray(old_lse), lse)


@pytest.mark.parametrize(
    "bits,pages,opts",
    [
        ((4, 2), 8, {}),
        ((4, 2), 8, {"table_smem": False}),
        ((4, 2), 300, {"num_splits": 1, "pages_per_step": 2}),
        ((4, 2), 9, {"num_splits": 4}),
        ((8, 8), 8, {"stages": 2}),
        ((8, 8), 8, {"page": 32}),
        ((4, 2), 8, {"page": 16, "word_unpack": False}),
        ((2, 2), 8, {"page": 16, "d": 64}),
        ((4, 4), 8, {"page": 128}),
        ((4, 4), 8, {"warpgroups": 4, "stages": 2}),
        ((4, 2), 8, {"precision": "bf16"}),  # one term of q and of p
        ((2, 4), 9, {"warpgroups": 4, "page": 32, "stages": 3, "num_splits": 3}),
        ((4, 4), 8, {"page": 128, "value_regs": False}),  # V's operand staged, where registers are the default
        ((4, 4), 8, {"value_regs": False, "softmax": "running"}),
    ],
)
def test_lowers_for_cuda(bits, pages, opts):
    """Compiled lowering checks what the interpreter does not (e.g. copy sizes): the page table from shared memory
    or global memory, a split past TMA's 256-entry box, ragged splits, 8-bit pages (128-byte code rows), pages of
    16, 32 (a tile's pages loaded by `_load_pages_mgpu`; scale rows under TMA's 128 bytes) and 128 tokens; four
    programs a block (`warpgroups=4`); precision "bf16" (p's second term zeros, which must be in the MMA layout: a
    compiled check found the plain zeros array refused, H100 2026-12-06)."""
    opts = dict(opts)
    shape = {k: opts.pop(k) for k in ("page", "d") if k in opts}
    args, kw = _case(*bits, b=2, pages=pages, **shape)

    def f(*a):
        return mg.paged_attention(*a, **kw, **opts)

    sds = [None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*sds).mlir_module()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(ks=KVSpec(bits=16)), "keys: 16-bit"),
        (dict(vs=KVSpec(bits=4, axis="token", group_size=32)), "values: .*group_size=32"),
        (dict(ks=KVSpec(bits=4, axis="channel", group_size=32)), "keys: axis=channel"),
        (dict(vs=KVSpec(bits=16)), "values: 16-bit"),
    ],
)
def test_refuses_what_it_does_not_read(change, match):
    args, kw = _case(4, 4, b=2, pages=2, **change)
    with pytest.raises(ValueError, match=match):
        mg.paged_attention(*args, **kw)


def test_refuses_prefill_and_wide_groups():
    args, kw = _case(4, 4, b=2, pages=2, group=8)
    q = args[0]
    with pytest.raises(ValueError, match="decode"):
        mg.paged_attention(jnp.concatenate([q, q], axis=2), *args[1:], **kw)
    wide = jnp.concatenate([q, q], axis=1)  # GQA group 16
    with pytest.raises(ValueError, match="GQA group 16"):
        mg.paged_attention(wide, *args[1:], **kw)
    with pytest.raises(ValueError, match="num_splits=3: expected 1 to the page table's 2 pages"):
        mg.paged_attention(*args, **kw, num_splits=3)


def test_refuses_fp8_codes():
    """fp8 pools (8-bit, but floats) are not integer codes: refused here, and never routed here by `mosaic_route`."""
    from pallas_kernels.paged_attention_gpu import mosaic_route

    fp8 = KVSpec(bits=8, axis="token", group_size=128, mode="fp8")
    args, kw = _case(8, 8, b=2, pages=2, ks=fp8)
    with pytest.raises(ValueError, match="keys: mode 'fp8'; this kernel reads integer codes only"):
        mg.paged_attention(*args, **kw)
    q, kc, vc, vscale = args[0], args[1], args[4], args[5]
    assert not mosaic_route(q, kc, vc, vscale, k_spec=fp8, v_spec=kw["v_spec"], interpret=False, capability="9.0")


def test_refuses_bf16_operands_for_eight_bit_codes():
    args, kw = _case(8, 8, b=2, pages=2)
    for name in ("key_f16", "value_f16"):
        with pytest.raises(ValueError, match=f"{name}=False: 8-bit codes need f16 operands"):
            mg.paged_attention(*args, **kw, **{name: False})


def test_softmax_default_follows_the_probabilities_type(monkeypatch):
    """f16 probabilities (8-bit values) take the online softmax, bf16 ones the fixed reference."""
    seen = []
    real = mg._call
    monkeypatch.setattr(mg, "_call", lambda *a, **kw: seen.append((kw["value_f16"], kw["fixed"])) or real(*a, **kw))
    for kb, vb in ((8, 8), (8, 4)):
        args, kw = _case(kb, vb, b=1, h=1, pages=1)
        mg.paged_attention(*args, **kw, interpret=not COMPILED)
    assert seen == [(True, False), (False, True)]


def test_mosaic_route():
    """`kernel="auto"` picks the Mosaic GPU kernel for what it was measured faster on, and only what it reads."""
    from pallas_kernels.paged_attention_gpu import mosaic_route

    def route(kb, vb, capability="9.0", interpret=False, page=PAGE, tokens=1, v_scale_dtype=None):
        args, kw = _case(kb, vb, b=1, h=1, pages=1, page=max(page, PAGE))
        q, kc, vc, vscale = args[0], args[1][:, :, :page], args[4][:, :, :page], args[5]
        q = jnp.concatenate([q] * tokens, axis=2)
        vscale = vscale.astype(v_scale_dtype or vscale.dtype)
        assert vscale.dtype == (v_scale_dtype or jnp.float16)
        return mosaic_route(q, kc, vc, vscale, k_spec=kw["k_spec"], v_spec=kw["v_spec"], interpret=interpret,
                            capability=capability)  # fmt: skip

    assert route(8, 8) and route(8, 4) and route(4, 8) and route(8, 2)
    assert route(8, 4, v_scale_dtype=jnp.bfloat16)  # bf16 probabilities: no f16 range to keep
    assert not route(8, 8, v_scale_dtype=jnp.bfloat16)
    # 2- and 4-bit pairs where it was timed faster: pages of 32 and 64; pages of 16 and 128 stay on Triton
    assert route(4, 4) and route(2, 2) and route(4, 2) and route(2, 4, page=32)
    assert not route(4, 4, page=16) and not route(4, 2, page=128)
    assert not route(4, 4, capability="8.0") and not route(4, 4, interpret=True)
    assert not route(8, 8, capability="8.0") and not route(8, 8, capability="")
    if jax.default_backend() == "cpu":  # capability None: the default device's (none on a CPU)
        assert not route(8, 8, capability=None)
    assert not route(8, 8, interpret=True)
    assert route(8, 8, page=32) and route(8, 4, page=16)  # pages of 16 to 128 tokens (64 and 32 measured)
    assert not route(8, 8, page=48)  # a page size it does not read
    assert not route(8, 8, tokens=2)  # decode only


def test_gpu_dispatcher_runs_the_mosaic_kernel():
    """`paged_attention_gpu.paged_attention(kernel="mgpu")` (what `kernel="auto"` does where `mosaic_route` says so)
    against the reference; compiled on a Hopper GPU, `kernel="auto"` routes 8/8 there."""
    from pallas_kernels import paged_attention_gpu as pg

    for page in (PAGE, 32):  # the engine's default page size is 32
        args, kw = _case(8, 8, seed=19, page=page, pages=4 * PAGE // page)
        with jax.default_matmul_precision("highest"):
            want, want_lse = paged_attention_reference(*args, **kw)
        got, lse = pg.paged_attention(*args, **kw, kernel="mgpu", interpret=not COMPILED)
        got, want = np.asarray(got), np.asarray(want)
        assert np.max(np.abs(got - want)) <= TOL["high"] * np.max(np.abs(want))
        if COMPILED:
            assert pg.mosaic_route(args[0], args[1], args[4], args[5], k_spec=kw["k_spec"], v_spec=kw["v_spec"],
                                   interpret=False)  # fmt: skip
            auto, _ = pg.paged_attention(*args, **kw)
            np.testing.assert_array_equal(np.asarray(auto), got)
    with pytest.raises(ValueError, match="kernel='cuda': expected one of"):
        pg.paged_attention(*args, **kw, kernel="cuda")
    args48, kw48 = _case(4, 4, b=2, pages=2, page=48)
    with pytest.raises(ValueError, match=r"page size 48; needs one of \(16, 32, 64, 128\)"):
        pg.paged_attention(*args48, **kw48, kernel="mgpu")


def test_default_splits_fill_the_last_wave():
    """Programs an SM holds follow the shared memory each needs (4/4 pages of 64: 3, as Nsight counted on an H100;
    8-bit pages: 2), and the default splits give at least two waves, choosing among up to twice that count the one
    whose last wave is fullest (8/8 at pages of 32, batch 48: 2 splits, 0.737 ms against 3 splits' 0.812)."""
    import math

    def pools(kb, vb, page, d=128, n=8):
        def sds(shape, dt):
            return jax.ShapeDtypeStruct(shape, dt)

        scale = sds((8, n, page, 1), jnp.float16)
        return (sds((8, n, page, d * kb // 8), jnp.uint8), scale, scale,
                sds((8, n, page, d * vb // 8), jnp.uint8), scale, scale)  # fmt: skip

    assert mg.programs_per_sm(pools(4, 4, 64), 64, 1, 4, 128) == 3
    assert mg.programs_per_sm(pools(8, 8, 64), 64, 1, 4, 128) == 2
    assert mg.programs_per_sm(pools(8, 8, 32), 32, 2, 4, 128) == 2
    assert mg.programs_per_sm(pools(8, 8, 32), 32, 2, 2, 128) == 3  # two steps in flight: half the page slots
    # four programs a block: one block an SM where four programs' slots fit (4/4 at 2 or 3 stages), else none
    assert [mg.programs_per_sm(pools(4, 4, 64), 64, 1, s, 128, 4) for s in (2, 3, 4)] == [4, 4, 0]
    assert mg.programs_per_sm(pools(2, 2, 64), 64, 1, 4, 128, 4) == 4
    assert mg.programs_per_sm(pools(8, 8, 64), 64, 1, 2, 128, 4) == 0
    # V's operand in registers (`value_regs`): no V staging tile, 16 KB less a program at D = 128 and pages of 64
    assert mg.program_smem(pools(4, 4, 64), 64, 1, 4, 128) - mg.program_smem(pools(4, 4, 64), 64, 1, 4, 128, True) == (
        64 * 128 * 2
    )
    assert mg.programs_per_sm(pools(8, 8, 64), 64, 1, 4, 128, 1, True) == 3
    assert mg.programs_per_sm(pools(8, 8, 64), 64, 1, 2, 128, 4, True) == 4
    assert mg.programs_per_sm(pools(4, 4, 64), 64, 1, 4, 128, 4, True) == 4
    for programs, per_sm in ((384, 2), (256, 2), (256, 3), (64, 3), (8, 3), (4096, 2)):
        slots = per_sm * mg.SMS
        got = mg._default_splits(programs, 256, 8, per_sm)
        first = min(math.ceil(2 * slots / programs), 32)
        fullness = [
            (-(-programs * s // slots) * slots / (programs * s), s) for s in range(first, min(2 * first, 32) + 1)
        ]
        assert got == min(fullness, key=lambda f: (round(f[0], 3), f[1]))[1]
        assert got >= first  # at least two waves where the pages allow
    assert mg._default_splits(384, 512, 8, 2) == 2  # 768 programs: 2.9 waves of 264, where 3 splits give 4.4
    assert mg._default_splits(256, 4, 4, 3) == 1  # a split keeps at least the steps in flight
