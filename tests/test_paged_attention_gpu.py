"""GPU (Pallas/Triton) dequant-fused paged attention against `paged_attention_reference`.

Runs in interpret mode on CPU; KVTUNER_TEST_COMPILED=1 runs the kernel compiled on a real GPU.

Tolerance: the kernel feeds tensor-core dots with bf16 operands. Codes are exact in bf16; the float32 query and the
probabilities are split into 2 bf16 terms (~16 significant bits, relative error <= 2^-17 per element), scales and
zero-points are folded in float32, and the softmax is the same float32 online softmax as the reference up to
ordering. Errors of ~2^-17 per product, summed over up to a few hundred terms and passed through exp, land near
1e-5 relative; we assert ||out - ref|| / ||ref|| < 1e-4 and |lse - lse_ref| < 1e-4, which a wrong page, group,
field, scale or mask (errors of order 1) cannot pass. `parts=1` (plain bf16) is checked at the bf16 level, 2e-2.
The f16 operands (8-bit codes as `eight_bit="f16"`, small value groups dequantized in f16 at bf16 precision) carry
11 significant bits per part instead of 8, so the same tolerances hold with room; their range handling gets tests of
its own.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import gpu_attention_lowered

from kvtuner_jax.quant import scale_dtype_of
from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout
from pallas_kernels import paged_attention_gpu as gpu
from pallas_kernels.paged_attention import paged_attention as dispatch
from pallas_kernels.paged_attention import paged_attention_reference, resolve_precision
from pallas_kernels.paged_attention_gpu import paged_attention

COMPILED = os.environ.get("KVTUNER_TEST_COMPILED") == "1"
INTERPRET = not COMPILED
RTOL = 1e-4


def _spec(bits, axis="token", group=64, sym=False, sdt="float16"):
    return KVSpec(bits=bits, axis=axis, group_size=group, symmetric=sym, scale_dtype=sdt)


def _store(rng, spec, h, n, p, d):
    """Random pool arrays for one store (codes uniform over [0, 2^b), scales positive, zeros of both signs)."""
    codes, scale, zero = layout.allocate(spec, h, n, p, d)
    if not spec.quantized:
        return jnp.asarray(rng.standard_normal(codes.shape).astype(np.float32)).astype(jnp.bfloat16), None, None
    codes = jnp.asarray(rng.integers(0, 256, codes.shape, dtype=np.uint8))
    sdt = scale_dtype_of(spec.scale_dtype)
    scale = jnp.asarray(rng.uniform(0.02, 0.3, scale.shape).astype(np.float32)).astype(sdt)
    if zero is not None:
        zero = jnp.asarray(rng.normal(0, 1.0, zero.shape).astype(np.float32)).astype(sdt)
    return codes, scale, zero


def _case(rng, k_spec, v_spec, *, b=2, h=2, hg=2, tq=1, d=64, p=16, n=None, max_pages=4, lengths=None):
    n = n or b * max_pages + 2
    k = _store(rng, k_spec, h, n, p, d)
    v = _store(rng, v_spec, h, n, p, d)
    q = jnp.asarray(rng.standard_normal((b, h * hg, tq, d)).astype(np.float32))
    # Distinct physical pages per sequence, in shuffled order; INVALID (-1) past each sequence's end.
    perm = rng.permutation(n)[: b * max_pages].reshape(b, max_pages)
    if lengths is None:
        lengths = rng.integers(0, max_pages + 1, b) * p
    lengths = np.asarray(lengths, np.int32)
    pt = np.where(np.arange(max_pages)[None, :] < (lengths // p)[:, None], perm, -1).astype(np.int32)
    return q, k, v, jnp.asarray(pt), jnp.asarray(lengths)


# Interpret mode is dominated by XLA:CPU compiling the interpreted kernel; -O0 compiles it ~3x faster and still runs
# these tiny shapes in milliseconds.
_FAST_COMPILE = {"xla_backend_optimization_level": 0} if INTERPRET else {}


def _compile(fn, *args, **kw):
    """jit(fn(*args, **kw)) compiled with the test's compiler options (None arguments stay static), as a function of
    the arguments: call it with others of the same shapes and the same None places (e.g. clean and poisoned pools)
    without compiling again."""
    idx = [i for i, a in enumerate(args) if a is not None]

    def f(*xs):
        full = [None] * len(args)
        for i, x in zip(idx, xs, strict=True):
            full[i] = x
        return fn(*full, **kw)

    compiled = jax.jit(f).lower(*[args[i] for i in idx]).compile(compiler_options=_FAST_COMPILE)

    def call(*others):
        assert [i for i, a in enumerate(others) if a is not None] == idx, "None in other places than compiled for"
        return compiled(*[others[i] for i in idx])

    return call


def _run(fn, *args, **kw):
    """jit(fn(*args, **kw)) compiled with the test's compiler options (None arguments stay static)."""
    return _compile(fn, *args, **kw)(*args)


def _kernel(*args, **kw):
    return _run(paged_attention, *args, interpret=INTERPRET, **kw)


def _reference(*args, **kw):
    # On a GPU, XLA's default float32 matmul precision is TF32-like (~1e-3): ask for true float32 in the oracle.
    with jax.default_matmul_precision("highest"):
        return _run(paged_attention_reference, *args, **kw)


def _same(a, b, exact: bool = True):
    """Two ways of computing the same float32 operations on the same values: equal bit for bit in interpret mode.
    Compiled, ptxas may contract and order the float work differently between the two kernels (seen on the H200,
    2026-12-05: ~1e-6 relative), so there they must agree to 1e-5 of the output's norm, as they must in interpret
    mode too where the kernels' XLA:CPU programs differ in more than their float work (`exact=False`: XLA may then
    fuse and order a dot's sums differently)."""
    a, b = np.asarray(a), np.asarray(b)
    if exact and not COMPILED:
        np.testing.assert_array_equal(a, b)
        return
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    fin = np.isfinite(a)
    assert np.linalg.norm(a[fin] - b[fin]) <= 1e-5 * max(np.linalg.norm(a[fin]), 1e-30)


def _sm_scale(q):
    """The softmax scale `_check` assumes: 1/sqrt(head_dim)."""
    return 1.0 / np.sqrt(q.shape[-1])


def _check(q, k, v, pt, nt, k_spec, v_spec, rtol=RTOL, outputs=None, **kw):
    """The kernel's (out, lse) at sm_scale `_sm_scale(q)` against the reference's; `outputs`: that call's results,
    already computed (the kernel is not compiled again)."""
    sm = _sm_scale(q)
    args = (q, *k, *v, pt, nt)
    out, lse = outputs if outputs is not None else _kernel(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=sm, **kw)
    ref, ref_lse = _reference(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=sm)
    out, lse, ref, ref_lse = map(np.asarray, (out, lse, ref, ref_lse))
    assert np.all(np.isfinite(out))
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < rtol, f"relative error {err:.2e}"
    empty = np.asarray(nt) == 0
    assert np.all(out[empty] == 0) and np.all(lse[empty] == -np.inf)
    fin = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=rtol * 10, rtol=rtol)
    return out, lse


# (K spec, V spec, head_dim, page size, GQA): every bit pair at least once, both axes, sym/asym, both scale dtypes,
# groups smaller than / equal to the packed axis, hd 64 and 128, pages 16 and 64, GQA 1, 2, 4, 8.
CASES = [
    (_spec(16), _spec(16), 64, 16, 1),
    (_spec(16), _spec(8, sym=True), 64, 16, 4),
    (_spec(16), _spec(4, group=32), 128, 16, 2),
    (_spec(16), _spec(2, "channel", 16), 64, 16, 1),
    (_spec(8), _spec(16), 64, 16, 8),
    (_spec(8, "channel", 32, sdt="bfloat16"), _spec(8, group=64), 64, 64, 4),
    (_spec(8, group=128, sym=True), _spec(4, "channel", 32), 128, 64, 2),
    (_spec(8, group=32), _spec(2, group=64), 64, 16, 1),
    (_spec(4), _spec(16), 64, 16, 2),
    (_spec(4, "channel", 32), _spec(8, "channel", 16, sym=True), 64, 64, 4),
    (_spec(4, group=128), _spec(4, group=128), 128, 16, 4),
    (_spec(4, group=16, sym=True), _spec(2, "channel", 32, sym=True), 64, 64, 8),
    (_spec(2, group=64), _spec(16), 64, 16, 4),
    (_spec(2, "channel", 16, sym=True), _spec(8, "channel", 16), 64, 16, 2),
    (_spec(2, "channel", 16), _spec(4, group=32, sym=True, sdt="bfloat16"), 64, 16, 1),
    (_spec(2, group=32), _spec(2, group=32), 128, 64, 8),
]


def _id(c):
    def one(s):
        if not s.quantized:
            return "16"
        return f"{s.bits}{s.axis[0]}G{s.group_size}{'s' if s.symmetric else 'a'}"

    k, v, d, p, g = c
    return f"K{one(k)}-V{one(v)}-D{d}-P{p}-gqa{g}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, rng):
    k_spec, v_spec, d, p, hg = case
    q, k, v, pt, nt = _case(rng, k_spec, v_spec, d=d, p=p, hg=hg, b=3, max_pages=4, lengths=[0, 4 * p, 2 * p])
    _check(q, k, v, pt, nt, k_spec, v_spec)


@pytest.mark.parametrize("tuning", [dict(pages_per_block=2, num_splits=2), dict(pages_per_block=1, num_splits=3)])
def test_splits_and_blocks(tuning, rng):
    """Flash-decoding splits (some empty) and multi-page blocks with a partial last block combine exactly."""
    ks, vs = _spec(4, group=64), _spec(2, group=64, sym=True)
    q, k, v, pt, nt = _case(rng, ks, vs, b=3, hg=4, max_pages=5, lengths=[5 * 16, 16, 3 * 16])
    _check(q, k, v, pt, nt, ks, vs, **tuning)


def test_prefill_chunk_and_bf16_query(rng):
    """Tq > 1 (a chunk of query tokens per sequence) with a bf16 query (one exact bf16 operand term)."""
    ks, vs = _spec(4, group=64), _spec(8, group=64)
    q, k, v, pt, nt = _case(rng, ks, vs, b=2, hg=4, tq=5, lengths=[3 * 16, 4 * 16])
    _check(q.astype(jnp.bfloat16), k, v, pt, nt, ks, vs)


def test_long_query_chunk_is_cut_into_row_tiles(rng):
    """More query rows than one program holds (max_rows): pieces of 2 tokens x GQA 4, the last piece shorter."""
    ks, vs = _spec(4, "channel", 16), _spec(2, group=32)
    q, k, v, pt, nt = _case(rng, ks, vs, b=2, hg=4, tq=5, lengths=[3 * 16, 0])
    _check(q, k, v, pt, nt, ks, vs, max_rows=8)


@pytest.mark.skipif(not COMPILED, reason="a Llama-sized prefill chunk is a GPU shared-memory check (compiled only)")
@pytest.mark.parametrize(
    "kv", [(_spec(4, group=128), _spec(4, group=128)), (_spec(2, "channel", 32), _spec(2, group=32)), (_spec(16),) * 2]
)
def test_llama_prefill_chunk_compiles_and_matches(kv, rng):
    """A 128-token chunk at GQA 4, head_dim 128 (512 query rows per KV head) fits the GPU once cut into row tiles."""
    ks, vs = kv
    q, k, v, pt, nt = _case(rng, ks, vs, b=2, h=2, hg=4, tq=128, d=128, p=64, max_pages=4, lengths=[4 * 64, 3 * 64])
    _check(q.astype(jnp.bfloat16), k, v, pt, nt, ks, vs)


@pytest.mark.parametrize("keys", ["stack", "fold", "dequant"])
@pytest.mark.parametrize("hg,tq", [(2, 1), (4, 1), (2, 3), (8, 1)])
def test_channel_key_paths(keys, hg, tq, rng):
    """Every per-channel key path (a block's 4 token groups side by side in the query columns / query re-scaled per
    group / keys dequantized in the kernel), blocks of 2 pages of 2 groups; with 8 or more query rows the 4 groups do
    not fit in 16 padded rows and "stack" falls back to "fold"."""
    ks, vs = _spec(2, "channel", 8, sym=True), _spec(4, group=32)
    q, k, v, pt, nt = _case(rng, ks, vs, b=4, hg=hg, tq=tq, max_pages=5, lengths=[5 * 16, 3 * 16 - 16, 16, 0])
    _check(q, k, v, pt, nt, ks, vs, channel_keys=keys, pages_per_block=2)
    if keys == "stack":
        _check(q, k, v, pt, nt, ks, vs, channel_keys=keys, pages_per_block=1, num_splits=2)
        _check(q, k, v, pt, nt, ks, vs, channel_keys=keys, pages_per_block=2, _variant="kgather")


@pytest.mark.parametrize("variant", ["", "w32"])
@pytest.mark.parametrize("kbits", [4, 2])
@pytest.mark.parametrize(
    "vspec,tuning",
    [
        (_spec(16), {}),
        (_spec(4, group=64), {}),  # one group per head: zero-point terms deferred per token
        (_spec(2, group=32, sym=True), {}),  # small groups, dequantized
        (_spec(2, group=32), dict(small_value_groups="fold")),
    ],
    ids=["V16", "V4t64", "V2t32dequant", "V2t32fold"],
)
def test_stacked_keys_in_token_sub_blocks(kbits, vspec, tuning, variant, rng):
    """Stacked 2/4-bit per-channel keys are read in storage order, one token sub-block per field of their bytes (every
    2nd / 4th token of a page), each with its values read at that row stride: every kind of value side, the default
    block of 32 rows and the smallest one (16) with splits, ragged lengths (empty, mid-block); codes read as bytes
    and as words."""
    ks = _spec(kbits, "channel", 16)
    per = 8 // kbits
    q, k, v, pt, nt = _case(rng, ks, vspec, b=4, hg=2, max_pages=5, lengths=[5 * 16, 3 * 16, 0, 16])
    for ppb, splits in ((2 * per, None), (per, 2)):  # sub-blocks of 32 and 16 rows
        plan = gpu.stack_plan(_side(ks), _side(vspec), 2, 16, 16, 5, 4, ppb, "stack", "", 2)
        assert plan[2] == per, plan  # sub-blocks in use
        _check(q, k, v, pt, nt, ks, vspec, pages_per_block=ppb, num_splits=splits, _variant=variant, **tuning)


def _side(spec, d=64, p=16):
    codes = layout.allocate(spec, 1, 1, p, d)[0]
    return gpu._side(spec, codes, p, d, min_cb=32 if spec.quantized and spec.group_size < d else 16)


def test_stack_plan():
    """(pages per block, stacked groups, token sub-blocks) for per-channel keys: by default sub-blocks of 64 rows where
    the stacked groups fit 16 padded rows (32 suffice at bf16 precision); with the caller's block size any of >= 16
    rows; none with channel-axis values or with `kgather`."""
    v2 = _spec(2, group=32)

    def plan(kbits, page_size=64, rows=4, ppb=1, pages_per_block=None, group=32, values=v2, d=128, **kw):
        ks, vs = _side(_spec(kbits, "channel", group), d, page_size), _side(values, d, page_size)
        kw = dict(channel_keys="stack", variant="", parts=2) | kw
        return gpu.stack_plan(ks, vs, rows, 16, page_size, 256, ppb, pages_per_block, **kw)

    # Llama GQA 4 decode (4 rows), page 64 (2 groups a page): 2 pages (4 groups x 4 rows = 16 columns).
    assert plan(4) == (2, 4, 2)
    # 2-bit keys: 2 pages are sub-blocks of 32 rows: only at bf16 precision (token order otherwise, 1 page)
    assert plan(2) == (1, 2, 1)
    assert plan(2, parts=1) == (2, 4, 4)
    # page 32: 4 pages of one group for 4-bit keys (64-row sub-blocks)
    assert plan(4, page_size=32, ppb=2) == (4, 4, 2)
    # the caller's block: 1 page of 64 is 2 sub-blocks of 32 rows; 1 page of 16 at 4 bits would be 8 rows: token order
    assert plan(4, pages_per_block=1) == (1, 2, 2)
    assert plan(4, page_size=16, ppb=4, pages_per_block=1, group=16, d=64)[2] == 1
    assert plan(4, variant="kgather") == (1, 2, 1)
    assert plan(4, values=_spec(4, "channel", 32)) == (1, 2, 1)
    # GQA 8, groups of 16 (4 a page): 32 columns do not fit 16: one dot per group
    assert plan(4, rows=8, group=16) == (1, 0, 1)


def test_unknown_kernel_options_are_clear_errors(rng):
    ks, vs = _spec(4, "channel", 16), _spec(2, group=32)
    q, k, v, pt, nt = _case(rng, ks, vs, lengths=[16, 32])
    for opt, val, names in (("channel_keys", "stacked", "'stack', 'fold', 'dequant'"),
                            ("small_value_groups", "stack", "'dequant' or 'fold'"),
                            ("eight_bit", "fp16", "'nibbles', 'f16'")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{opt}='{val}': expected .*{names}"):
            paged_attention(q, *k, *v, pt, nt, k_spec=ks, v_spec=vs, sm_scale=1.0, interpret=True, **{opt: val})
    # A removed or misspelt `_variant` item (here one removed on 2026-12-05) must not quietly time the default kernel
    with pytest.raises(ValueError, match=r"_variant='w32,corder2': unknown item\(s\) \['corder2'\]"):
        paged_attention(q, *k, *v, pt, nt, k_spec=ks, v_spec=vs, sm_scale=1.0, interpret=True, _variant="w32,corder2")


@pytest.mark.parametrize("values", ["fold", "dequant"])
@pytest.mark.parametrize("vspec", [_spec(2, group=16), _spec(8, group=32, sym=True)], ids=["v2g16", "v8g32sym"])
@pytest.mark.parametrize("d", [64, 128])
def test_small_value_group_paths(values, vspec, d, rng):
    """Per-token values with several groups per head, both paths. Dequantized, a column block holds >= 32 bytes
    (at d=128: four 2-bit groups of 16 / two 8-bit groups of 32), folded >= 16 (2-bit: two groups of 16)."""
    ks = _spec(4, group=64)
    q, k, v, pt, nt = _case(rng, ks, vspec, b=2, hg=4, d=d, max_pages=3, lengths=[3 * 16, 16])
    _check(q, k, v, pt, nt, ks, vspec, small_value_groups=values)


def test_parts_one_is_bf16_precision(rng):
    ks, vs = _spec(4, group=64), _spec(4, group=64)
    q, k, v, pt, nt = _case(rng, ks, vs, b=2, hg=4, lengths=[3 * 16, 4 * 16])
    _check(q, k, v, pt, nt, ks, vs, rtol=2e-2, parts=1)


# Stacked per-channel keys at GQA 4 in blocks of 4 one-group pages: the scales of a block's groups are block loads
# broadcast to the columns (8-bit keys read as whole pages, 4-bit keys in 2 sub-blocks, 2-bit keys in token order
# beside 8-bit channel-axis values, also read as whole pages), or picked by a select chain (`qselect`): a NaN-scaled
# stale page must not leak through either.
STACKED = dict(pages_per_block=4, num_splits=1)
VSELECT = STACKED | dict(_variant="vselect")  # small value groups' scales by a select chain (see test_vload_...)
VHALF = STACKED | dict(parts=1)  # ... dequantized in f16 at bf16 precision (see test_vhalf_...)
# 8-bit per-token codes as whole-byte f16 operands (default): their value scales set a split-wide power of two in a
# pass of their own, which must skip stale pages' NaN scales too; and as bf16 nibbles
NIBBLES = dict(eight_bit="nibbles")
VZERO = dict(pages_per_block=1, parts=1)  # 16-bit values of one-page blocks zeroed by the load's mask (see test_vzero)
W32, NW32 = dict(_variant="w32"), dict(_variant="nw32")  # codes read as words or bytes: stale codes stay masked
RUNNING = dict(softmax="running")  # (the default "fixed": a stale page's NaN must not reach its reference either)


@pytest.mark.parametrize(
    "kv,hg,tunings",
    [
        ((_spec(4, group=64), _spec(16)), 2, (VZERO, VZERO | dict(num_splits=4))),
        (
            (_spec(16), _spec(16)),
            4,
            (VZERO, dict(pages_per_block=2, parts=1), VZERO | dict(_variant="novzero"), VZERO | RUNNING, RUNNING),
        ),
        ((_spec(16), _spec(2, "channel", 16)), 2, (W32,)),
        ((_spec(4, "channel", 8), _spec(2, group=32)), 2, ()),
        ((_spec(8, "channel", 16), _spec(4, group=32)), 4, (STACKED,)),
        (
            (_spec(4, "channel", 16), _spec(2, group=32)),
            4,
            (
                STACKED,
                STACKED | dict(_variant="qselect"),
                VSELECT,
                VHALF,
                VHALF | dict(_variant="vselect,w32"),
                VHALF | dict(_variant="novhalf"),
            ),
        ),
        ((_spec(2, "channel", 16, sym=True), _spec(8, "channel", 16)), 4, (STACKED,)),
        (
            (_spec(8, group=64), _spec(8, group=64, sym=True)),
            2,
            (NIBBLES, NIBBLES | dict(pages_per_block=1, num_splits=4), NW32),
        ),
        ((_spec(4, "channel", 16), _spec(8, group=64)), 4, (STACKED, NIBBLES | STACKED)),
        ((_spec(4, group=64), _spec(2, group=64)), 2, (RUNNING, RUNNING | dict(pages_per_block=1, num_splits=4))),
        ((_spec(2, "channel", 16), _spec(2, group=32)), 4, (RUNNING | STACKED,)),
    ],
    ids=[
        "K4t-V16",
        "K16-V16",
        "K16-V2c",
        "K4c-V2t",
        "K8c-V4t-stacked",
        "K4c-V2t-stacked",
        "K2c-V8c-stacked",
        "K8t-V8t-f16",
        "K4c-V8t-f16-stacked",
        "K4t-V2t",
        "K2c-V2tG32-stacked",
    ],  # fmt: skip
)
def test_poisoned_pages_do_not_leak(kv, hg, tunings, rng):
    """Stale pages past num_tokens and INVALID (-1) entries, pointing at pages full of NaN, change nothing."""
    ks, vs = kv
    n, p = 10, 16
    q, k, v, _, _ = _case(rng, ks, vs, b=2, hg=hg, n=n, p=p)
    nt = jnp.asarray([2 * p, p], jnp.int32)
    pt = jnp.asarray([[3, 5, -1, -1], [7, -1, -1, -1]], jnp.int32)
    bad = [i for i in range(n) if i not in (3, 5, 7)]  # page 0 is where a clipped -1 lands: poisoned too

    def poison(arr):
        if arr is None:
            return None
        fill = np.nan if jnp.issubdtype(arr.dtype, jnp.floating) else 255
        return arr.at[:, jnp.asarray(bad)].set(jnp.asarray(fill, arr.dtype))

    k2, v2 = tuple(map(poison, k)), tuple(map(poison, v))
    pt2 = jnp.asarray([[3, 5, 1, 2], [7, 4, -1, 6]], jnp.int32)
    sm = _sm_scale(q)
    for tuning in (dict(), dict(pages_per_block=1, num_splits=4), *tunings):
        if tuning.get("pages_per_block") == 4:
            plan = gpu.stack_plan(_side(ks, p=p), _side(vs, p=p), hg, 16, p, 4, 4, 4, "stack", "", 2)
            assert plan[1] == 4, plan  # 4 stacked groups: 16 columns
        kernel = _compile(paged_attention, q, *k, *v, pt, nt, k_spec=ks, v_spec=vs, sm_scale=sm,
                          interpret=INTERPRET, **tuning)  # fmt: skip
        clean = kernel(q, *k, *v, pt, nt)
        dirty = kernel(q, *k2, *v2, pt2, nt)  # the same program: only the data differ
        if not tuning:
            _check(q, k, v, pt, nt, ks, vs, outputs=clean)  # the clean run is right
        for a, b in zip(clean, dirty, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dispatcher_routes_to_kernel(rng):
    ks, vs = _spec(8, group=64), _spec(4, group=64)
    q, k, v, pt, nt = _case(rng, ks, vs, lengths=[16, 3 * 16])
    sm = 0.125
    out, _ = _run(dispatch, q, *k, *v, pt, nt, k_spec=ks, v_spec=vs, sm_scale=sm, backend="gpu", interpret=INTERPRET)
    ref, _ = _reference(q, *k, *v, pt, nt, k_spec=ks, v_spec=vs, sm_scale=sm)
    assert np.linalg.norm(np.asarray(out) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref)) < RTOL


def test_dispatcher_bf16_precision(rng):
    """precision="bf16" (one bf16 operand term) stays at the bf16 level (2e-2) but is not the high-precision path:
    its error is well above the 1e-4 that "high" meets, so the option really reaches the kernel."""
    ks, vs = _spec(4, "channel", 16), _spec(2, group=32)
    q, k, v, pt, nt = _case(rng, ks, vs, hg=4, lengths=[4 * 16, 2 * 16])
    args = (q, *k, *v, pt, nt)
    ref, _ = _reference(*args, k_spec=ks, v_spec=vs, sm_scale=0.125)
    errs = {}
    for prec in ("high", "bf16"):
        out, _ = _run(dispatch, *args, k_spec=ks, v_spec=vs, sm_scale=0.125, backend="gpu", interpret=INTERPRET,
                      precision=prec)  # fmt: skip
        errs[prec] = np.linalg.norm(np.asarray(out) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert errs["high"] < RTOL and 10 * RTOL < errs["bf16"] < 2e-2, errs
    with pytest.raises(ValueError, match="precision"):
        dispatch(*args, k_spec=ks, v_spec=vs, sm_scale=0.125, backend="gpu", interpret=True, precision="fp32")


def test_rejects_pools_that_overflow_32_bit_offsets():
    """A 4 GiB uint8 pool (8/8 layer, batch 128 x 32K) crashed the H100 with an illegal address: refused up front."""
    from pallas_kernels.paged_attention_gpu import check_index_range

    big = jax.ShapeDtypeStruct((8, 65536, 64, 128), jnp.uint8)  # 2^32 bytes, 2^32 elements
    with pytest.raises(ValueError, match="k_codes .* 4.00 GiB"):
        check_index_range(k_codes=big)
    check_index_range(
        k_codes=jax.ShapeDtypeStruct((8, 32768, 64, 128), jnp.uint8)
    )  # 2 GiB: last offset 2^31 - 1 still fits
    check_index_range(v_codes=jax.ShapeDtypeStruct((8, 65536, 64, 128), jnp.bfloat16))  # 8 GiB: 64-bit offsets
    from pallas_kernels.quantize_write_gpu import quantize_write as write_gpu

    pages = jax.ShapeDtypeStruct((8, 2, 64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="codes .* 4.00 GiB"):  # the write kernel refuses the same pool
        jax.eval_shape(
            lambda c, pg: write_gpu(c, None, None, pg, jnp.zeros(2, jnp.int32), spec=_spec(8, group=128)), big, pages
        )


def test_auto_backend_falls_back_to_reference_where_the_kernel_cannot_run(rng, monkeypatch):
    """head_dim 32 with 2-bit per-token rows (8 bytes < one 16-wide tile): "auto" on a GPU runs the reference for that
    layer (exactly its numbers); an explicit backend="gpu" says why it cannot."""
    import pallas_kernels.paged_attention as pa

    ks, vs = _spec(2, group=32), _spec(4, "channel", 16)
    q, k, v, pt, nt = _case(rng, ks, vs, d=32, lengths=[2 * 16, 16])
    args = (q, *k, *v, pt, nt)
    monkeypatch.setattr(pa, "resolve_backend", lambda b: "gpu" if b == "auto" else b)  # as on a GPU machine
    out, lse = dispatch(*args, k_spec=ks, v_spec=vs, sm_scale=0.2, backend="auto", interpret=True)
    ref, ref_lse = paged_attention_reference(*args, k_spec=ks, v_spec=vs, sm_scale=0.2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match="token-axis group 32 / head_dim 32 at 2 bits"):
        dispatch(*args, k_spec=ks, v_spec=vs, sm_scale=0.2, backend="gpu", interpret=True)


def test_rejects_unsupported_shapes(rng):
    ks = _spec(4, group=64)
    q, k, v, pt, nt = _case(rng, ks, ks, p=16)
    with pytest.raises(ValueError):
        paged_attention(q[..., :48], *k, *v, pt, nt, k_spec=ks, v_spec=ks, sm_scale=1.0, interpret=True)


def _late_key_case(rng, factor, vs):
    """Keys of the first pages small, one key on the 4th page of sequence 0 aligned with KV head 0's queries and
    `factor` times longer: its scores exceed everything before it by ~4.3 * factor in the softmax's base 2."""
    ks = _spec(16)
    q, k, v, pt, nt = _case(rng, ks, vs, b=2, hg=2, max_pages=4, lengths=[4 * 16, 3 * 16])
    codes = np.asarray(k[0].astype(jnp.float32)) * 0.01
    qdir = np.asarray(q[0, ::2, 0]).sum(0)  # one direction shared by the queries of KV head 0 (hg=2)
    codes[0, int(pt[0, 3]), 5] = factor * qdir / np.linalg.norm(qdir) * np.sqrt(q.shape[-1])
    q = q.at[0, :2, 0].set(jnp.asarray(qdir / np.linalg.norm(qdir) * 3.0))
    return q, (jnp.asarray(codes).astype(jnp.bfloat16), None, None), v, pt, nt, ks, vs


# Values whose probabilities are bf16 operands (4-bit, one group per head), and f16 ones at bf16 precision with
# `_variant="fixedall"`: small groups dequantized in f16, 8-bit codes as f16 (p scaled to fit f16 up to 2^18).
# The small groups with their four fields joined into one dot (default), whose joined accumulators the redo refills,
# and one dot per field (`novjoin`).
F16P = dict(parts=1, _variant="fixedall")
LATE_VALUES = [(_spec(4, group=64), {}), (_spec(2, group=16), F16P | dict(_variant="fixedall,novjoin")),
               (_spec(8, group=64, sym=True), F16P), (_spec(2, group=16), F16P)]  # fmt: skip
LATE_IDS = ["V4t-bf16p", "V2tG16-f16p-separate", "V8t-f16p", "V2tG16-f16p-vjoin"]


@pytest.mark.parametrize("softmax", ["running", "fixed"])
@pytest.mark.parametrize("vs,prec", LATE_VALUES, ids=LATE_IDS)
def test_late_key_far_above_earlier_scores(softmax, vs, prec, rng):
    """A score ~430 (base 2) above everything before it: the running maximum must rescale what was summed, and an
    exponent against any earlier reference overflows float32 (and f16), so `softmax="fixed"` must notice the overflow
    and redo the split (with one split, or only the second of two) with the running softmax."""
    q, k, v, pt, nt, ks, vs = _late_key_case(rng, 100.0, vs)
    rtol = 2e-2 if prec else RTOL
    for tuning in (dict(pages_per_block=1, num_splits=1), dict(pages_per_block=1, num_splits=2), dict()):
        _check(q, k, v, pt, nt, ks, vs, rtol=rtol, softmax=softmax, **prec, **tuning)


@pytest.mark.parametrize("vs,prec", LATE_VALUES, ids=LATE_IDS)
def test_fixed_softmax_takes_large_rises_without_a_redo(vs, prec, rng, monkeypatch):
    """A score well above the fixed reference (block 0's maximum) but within range: ~52 (base 2) where p is a bf16
    operand (p ~2^52, below the 2^64 at which a split's sum of p counts as overflow; float32 keeps relative precision
    at any magnitude), ~13 where it is an f16 one (below its 2^18): the fixed pass alone is right, checked with the
    redo kernel replaced by one that does nothing. The same stand-in fails the ~430 rise, which needs the redo, and
    a ~78 rise, which the sum's limit sends there."""

    def no_redo(*refs, n_in, **kw):  # the outputs alias the fixed pass's results: left as they are
        del refs, n_in, kw

    monkeypatch.setattr(gpu, "_redo_kernel", no_redo)
    gpu.paged_attention.clear_cache()  # traces made with the real redo kernel
    try:
        rtol = 2e-2 if prec else RTOL
        q, k, v, pt, nt, ks, vs = _late_key_case(rng, 3.0 if prec else 12.0, vs)
        for tuning in (dict(pages_per_block=1, num_splits=1), dict(pages_per_block=1, num_splits=2)):
            _check(q, k, v, pt, nt, ks, vs, rtol=rtol, softmax="fixed", **prec, **tuning)
        for factor in (100.0, 18.0):
            q, k, v, pt, nt, ks, vs = _late_key_case(rng, factor, vs)
            with pytest.raises(AssertionError):
                _check(q, k, v, pt, nt, ks, vs, rtol=rtol, softmax="fixed", pages_per_block=1, num_splits=1, **prec)
    finally:
        monkeypatch.undo()
        gpu.paged_attention.clear_cache()


# Both softmaxes over the kernel's paths: per-token, per-channel (stacked, sub-blocks, folded, dequantized keys),
# 16-bit, small value groups (at "high"), 8-bit values as nibbles; ragged lengths including 0.
SOFTMAX_CASES = [
    ((_spec(16), _spec(16)), 64, 16, 4, {}),
    ((_spec(16), _spec(16)), 128, 64, 4, dict(pages_per_block=1, parts=1)),
    ((_spec(4, group=128), _spec(4, group=128)), 128, 16, 4, {}),
    ((_spec(2, group=64), _spec(2, group=64, sym=True)), 64, 64, 8, dict(parts=1)),
    ((_spec(4, "channel", 16), _spec(2, group=32)), 128, 16, 4, STACKED),
    ((_spec(2, "channel", 16), _spec(4, group=32)), 64, 16, 2, dict(channel_keys="fold")),
    ((_spec(4, "channel", 32), _spec(8, "channel", 16, sym=True)), 64, 64, 4, dict(channel_keys="dequant")),
    ((_spec(8, group=64), _spec(8, group=64, sym=True)), 64, 16, 2, dict(eight_bit="nibbles", num_splits=3)),
    ((_spec(2, "channel", 32), _spec(16)), 64, 32, 4, dict(pages_per_block=4)),
]


@pytest.mark.parametrize("softmax", ["fixed", "running"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: _id((*c[0], *c[1:4])) + "".join(f"-{k}{v}" for k, v in
                         c[4].items()))  # fmt: skip
def test_both_softmaxes_match_reference(case, softmax, rng):
    """`softmax="fixed"` (default: no per-block maximum, no rescaling; with `_variant="fixedall"`, so that the
    per-channel-key paths take it too) and "running" against the reference on fresh random pools, ragged lengths with
    an empty sequence, at the precision's usual tolerance."""
    (ks, vs), d, p, hg, tuning = case
    q, k, v, pt, nt = _case(rng, ks, vs, b=3, d=d, p=p, hg=hg, max_pages=4, lengths=[0, 4 * p, 3 * p])
    if softmax == "fixed":
        tuning = tuning | dict(_variant="fixedall")
    _check(q, k, v, pt, nt, ks, vs, rtol=2e-2 if tuning.get("parts") == 1 else RTOL, softmax=softmax, **tuning)


def test_fixed_softmax_where_timed():
    """The default `softmax="fixed"` is another kernel than "running" wherever probabilities are bf16 operands, as
    the H200 timed it (16-bit, per-token and per-channel (KIVI) keys), and the running kernel, unchanged, where they
    are f16 operands (8-bit per-token values as f16, small value groups dequantized in f16 at bf16 precision) unless
    `_variant="fixedall"`, which lowers their scaling at bf16 precision only (at "high", two f16 parts would lose the
    low one to f16's subnormals)."""
    low = gpu_attention_lowered
    t4, t8, full = _spec(4, group=128), _spec(8, group=128), _spec(16)
    bf16, run = dict(precision="bf16"), dict(softmax="running")
    allv = dict(_variant="fixedall")
    kivi = (_spec(4, "channel", 32), _spec(2, group=32))  # small value groups: f16 probabilities at bf16 only
    bf16_p = [(kv, prec) for kv in ((t4, t4), (full, full), (t4, _spec(2, group=128)), (full, t4),
                                    (_spec(4, "channel", 32), t4)) for prec in ({}, bf16)] + [(kivi, {})]  # fmt: skip
    for kv, prec in bf16_p:
        assert low(*kv, **prec) != low(*kv, **prec, **run) == low(*kv, **prec, **run, **allv)
        assert low(*kv, **prec) == low(*kv, **prec, **allv)
    assert low(t8, t8, eight_bit="nibbles") != low(t8, t8, eight_bit="nibbles", **run)
    for kv, prec in [((t4, t8), {}), ((t4, t8), bf16), (kivi, bf16)]:
        assert low(*kv, **prec) == low(*kv, **prec, **run)
        if kv[1] is t8 and not prec:  # f16 probabilities at "high": always the running softmax
            assert low(*kv, **prec, **allv) == low(*kv, **prec, **run)
        else:
            assert low(*kv, **prec, **allv) != low(*kv, **prec, **run)


@pytest.mark.parametrize(
    "kv,d,hg,tuning",
    [
        ((_spec(4, "channel", 16), _spec(2, group=32)), 128, 4, STACKED),
        ((_spec(2, "channel", 16), _spec(2, group=32)), 128, 4, dict(pages_per_block=2)),
        ((_spec(4, group=64), _spec(4, group=16, sym=True)), 128, 2, dict(parts=1)),
        ((_spec(8, group=64), _spec(8, group=16)), 128, 1, dict(eight_bit="nibbles")),
        ((_spec(16), _spec(8, group=16, sym=True)), 64, 2, dict(pages_per_block=1, num_splits=3)),
    ],
    ids=["K4c-V2tG32-stacked", "K2c-V2tG32", "K4t-V4tG16s-bf16", "K8t-V8tG16-nibbles", "K16-V8tG16s-splits"],
)
def test_vload_values_equal_the_select_chain(kv, d, hg, tuning, rng):
    """Small value groups' per-element scale tiles from [rows, groups] block loads broadcast along each group's bytes
    (default) instead of a select chain over the groups (`_variant="vselect"`): the same float32 operations on the
    same values, so the outputs are equal bit for bit (and to the reference within the usual tolerance)."""
    ks, vs = kv
    q, k, v, pt, nt = _case(rng, ks, vs, d=d, hg=hg, b=3, max_pages=4, lengths=[0, 4 * 16, 3 * 16])
    args = (q, *k, *v, pt, nt)
    sm = 1.0 / np.sqrt(d)
    chain = _kernel(*args, k_spec=ks, v_spec=vs, sm_scale=sm, _variant="vselect", **tuning)
    loaded = _kernel(*args, k_spec=ks, v_spec=vs, sm_scale=sm, **tuning)
    for a, b in zip(chain, loaded, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _check(q, k, v, pt, nt, ks, vs, rtol=2e-2 if tuning.get("parts") == 1 else RTOL, **tuning)


@pytest.mark.parametrize("variant", ["", "vselect"])
@pytest.mark.parametrize(
    "vspec,d",
    [(_spec(2, group=32), 128), (_spec(4, group=16, sym=True), 128), (_spec(8, group=32), 128),
     (_spec(2, group=16), 64)],
    ids=["V2tG32", "V4tG16s", "V8tG32", "V2tG16-D64"],
)  # fmt: skip
def test_vhalf_dequantizes_small_value_groups_in_f16(vspec, d, variant, rng):
    """At bf16 precision (parts=1) small value groups are dequantized in f16 arithmetic (code * scale + zero rounded
    once to f16's 11 significant bits, at most 2^-11 relative) against p * 2^14 in f16, where `_variant="novhalf"`
    rounds both to bf16's 8 bits (2^-8). With exact scores (16-bit keys, a bf16 query) the roundings of many
    independent elements average down to ~2e-4 relative with f16 and ~1.3e-3 with bf16 (8x apart, as the bit counts
    say); 5e-4 separates them with margin on both sides, so passing shows the f16 path is the one that ran."""
    ks = _spec(16)
    q, k, v, pt, nt = _case(rng, ks, vspec, d=d, hg=4, b=3, max_pages=4, lengths=[0, 4 * 16, 3 * 16])
    q = q.astype(jnp.bfloat16)
    errs = {}
    for half, var in ((True, variant), (False, ",".join(x for x in (variant, "novhalf") if x))):
        out, _ = _check(q, k, v, pt, nt, ks, vspec, rtol=2e-2, parts=1, _variant=var)
        ref, _ = _reference(q, *k, *v, pt, nt, k_spec=ks, v_spec=vspec, sm_scale=1.0 / np.sqrt(d))
        errs[half] = np.linalg.norm(out - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert errs[True] < 5e-4 < errs[False], errs


def test_vhalf_needs_f16_scales_and_bf16_precision(rng):
    """Scales stored as bf16 (whose range f16 lacks) or "high" precision: vhalf steps aside, bit for bit."""
    for vspec, tuning in ((_spec(2, group=32, sdt="bfloat16"), dict(parts=1)), (_spec(2, group=32), dict())):
        ks = _spec(4, group=64)
        q, k, v, pt, nt = _case(rng, ks, vspec, d=128, hg=2, lengths=[3 * 16, 16])
        args = (q, *k, *v, pt, nt)
        a = _kernel(*args, k_spec=ks, v_spec=vspec, sm_scale=0.1, _variant="novhalf", **tuning)
        b = _kernel(*args, k_spec=ks, v_spec=vspec, sm_scale=0.1, **tuning)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# 8-bit per-token codes as one whole-byte f16 operand (`eight_bit="f16"`) instead of two bf16 nibbles: keys,
# values (folded into p, and dequantized in small groups), with the other side at every kind, stacked per-channel
# keys in token sub-blocks beside them, GQA 1-8, and bf16-level precision (parts=1). f16 operand parts carry 11
# significant bits each (bf16: 8), so the same tolerances hold with room.
F16_CASES = [
    (_spec(8, group=128), _spec(8, group=128), 128, 16, 4, {}),
    (_spec(8, group=64, sym=True), _spec(8, group=32), 64, 16, 1, {}),
    (_spec(8, group=32), _spec(16), 64, 64, 8, {}),
    (_spec(16), _spec(8, group=64, sym=True, sdt="bfloat16"), 64, 16, 2, {}),
    (_spec(8, group=64), _spec(2, "channel", 16), 64, 16, 2, {}),
    (_spec(4, "channel", 16), _spec(8, group=64), 64, 16, 4, STACKED),
    (_spec(8, group=64), _spec(8, group=64), 64, 16, 4, dict(parts=1)),
    (_spec(8, group=64), _spec(8, group=32, sym=True), 64, 16, 2, dict(small_value_groups="fold")),
]


@pytest.mark.parametrize("eight_bit", ["f16", "nibbles"])
@pytest.mark.parametrize("case", F16_CASES, ids=lambda c: _id(c[:5]) + "".join(f"-{k}{v}" for k, v in c[5].items()))
def test_eight_bit_codes_match_reference(case, eight_bit, rng):
    """Both ways 8-bit per-token codes meet the tensor cores: whole-byte f16 operands (default) and bf16 nibbles."""
    k_spec, v_spec, d, p, hg, tuning = case
    q, k, v, pt, nt = _case(rng, k_spec, v_spec, d=d, p=p, hg=hg, b=3, max_pages=4, lengths=[0, 4 * p, 3 * p])
    rtol = 2e-2 if tuning.get("parts") == 1 else RTOL
    _check(q, k, v, pt, nt, k_spec, v_spec, rtol=rtol, eight_bit=eight_bit, **tuning)


@pytest.mark.parametrize("tq,hg,tuning", [(5, 4, {}), (20, 4, dict(max_rows=16))], ids=["chunk5", "chunk20-cut"])
def test_eight_bit_f16_prefill_chunk(tq, hg, tuning, rng):
    """Several query tokens per row tile (each row its own power-of-two scaling), and a chunk cut into row tiles of
    separate kernel calls; a bf16 query in the first (its f16 split is one exact part)."""
    ks, vs = _spec(8, group=64), _spec(8, group=64, sym=True)
    q, k, v, pt, nt = _case(rng, ks, vs, tq=tq, hg=hg, b=2, max_pages=4, lengths=[4 * 16, 2 * 16])
    if tq == 5:
        q = q.astype(jnp.bfloat16)
    _check(q, k, v, pt, nt, ks, vs, eight_bit="f16", **tuning)


def test_eight_bit_f16_range(rng):
    """f16 tops out at 65504 and loses precision below 2^-14: the kernel scales the query per row and the
    probabilities per split by powers of two. Queries of ~1e5 or ~1e-6 (with the inverse softmax scale, so the
    attention is the usual one and every bit of the query counts) and value scales of ~2000 or ~1e-5 (one sequence
    each) meet the reference as closely as ordinary ones, sequence by sequence. Unscaled, the large ones overflow to
    inf and the small ones round to f16 subnormals (checked: each scaling removed fails this test)."""
    ks, vs = _spec(8, group=64), _spec(8, group=64, sym=True)
    q, k, v, pt, nt = _case(rng, ks, vs, b=3, hg=2, max_pages=4, lengths=[4 * 16, 3 * 16, 4 * 16])
    vc, vsc, vz = v
    pages = np.asarray(pt)
    mult = np.ones(vsc.shape, np.float32)
    mult[:, pages[1][pages[1] >= 0]] = 8000.0
    mult[:, pages[2][pages[2] >= 0]] = 1e-4
    v = (vc, (vsc.astype(jnp.float32) * mult).astype(vsc.dtype), vz)
    args = (*k, *v, pt, nt)
    for qmul in (3e4, 1e-6):
        sm = 1.0 / (8.0 * qmul)
        ref, ref_lse = map(np.asarray, _reference(q * qmul, *args, k_spec=ks, v_spec=vs, sm_scale=sm))
        for tuning in (dict(num_splits=1), dict(pages_per_block=1, num_splits=3)):
            out, lse = map(np.asarray, _kernel(q * qmul, *args, k_spec=ks, v_spec=vs, sm_scale=sm, eight_bit="f16",
                                               **tuning))  # fmt: skip
            for i in range(3):  # per sequence: the small ones are not hidden by the large in one norm
                err = np.linalg.norm(out[i] - ref[i]) / np.linalg.norm(ref[i])
                assert err < RTOL, (qmul, tuning, i, err)
            np.testing.assert_allclose(lse, ref_lse, rtol=RTOL, atol=RTOL * 10)


def test_eight_bit_f16_leaves_other_widths_alone(rng):
    """Only 8-bit per-token sides change: a 4-bit / 2-bit per-channel pair gives the same bits either way."""
    ks, vs = _spec(4, group=64), _spec(2, "channel", 16)
    q, k, v, pt, nt = _case(rng, ks, vs, lengths=[3 * 16, 16])
    args = (q, *k, *v, pt, nt)
    a = _kernel(*args, k_spec=ks, v_spec=vs, sm_scale=0.125, eight_bit="nibbles")
    b = _kernel(*args, k_spec=ks, v_spec=vs, sm_scale=0.125)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "kv,d,p,hg,tq,tuning",
    [
        ((_spec(16), _spec(16)), 128, 64, 4, 1, {}),
        ((_spec(16), _spec(16)), 64, 16, 8, 1, dict(pages_per_block=1, num_splits=3)),
        ((_spec(4, group=32), _spec(16)), 64, 16, 2, 3, dict(pages_per_block=1)),
        ((_spec(2, "channel", 16), _spec(16)), 64, 64, 4, 1, {}),
    ],
    ids=["K16-V16-P64", "K16-V16-splits", "K4tG32-V16-chunk", "K2c-V16-P64"],
)
def test_vzero_matches_reference(kv, d, p, hg, tq, tuning, rng):
    """At bf16 precision, 16-bit value pages of one-page blocks are read by a scalar page and a masked load (pages
    past the end as zeros); the select it replaces (`_variant="novzero"`) gives the same bits, as both zero the
    same rows before the same dot. Per-channel keys beside them included; stale pages full of NaN are
    `test_poisoned_pages_do_not_leak`'s."""
    ks, vs = kv
    q, k, v, pt, nt = _case(rng, ks, vs, d=d, p=p, hg=hg, tq=tq, b=3, max_pages=4, lengths=[0, 4 * p, 3 * p])
    out = _check(q, k, v, pt, nt, ks, vs, rtol=2e-2, parts=1, **tuning)
    sel = _kernel(q, *k, *v, pt, nt, k_spec=ks, v_spec=vs, sm_scale=1.0 / np.sqrt(d), parts=1, _variant="novzero",
                  **tuning)  # fmt: skip
    for a, b in zip(out, sel, strict=True):
        _same(a, b)


@pytest.mark.parametrize(
    "kv,d,p,tuning",
    [
        ((_spec(4, group=128), _spec(4, group=128)), 128, 16, {}),
        ((_spec(2, group=32), _spec(8, group=32, sym=True)), 128, 16, dict(parts=1)),
        ((_spec(8, group=64), _spec(2, group=16)), 64, 16, dict(eight_bit="nibbles")),
        ((_spec(4, "channel", 32), _spec(2, group=32)), 128, 64, dict(parts=1)),
        ((_spec(2, "channel", 16), _spec(4, "channel", 16)), 64, 16, dict(_variant="kgather")),
        ((_spec(4, "channel", 16), _spec(8, "channel", 16)), 64, 16, dict(channel_keys="dequant")),
        ((_spec(8, "channel", 32), _spec(4, group=64)), 64, 64, dict(channel_keys="fold")),
        ((_spec(16), _spec(2, "channel", 16, sym=True)), 64, 16, dict(pages_per_block=1, num_splits=3)),
    ],
    ids=["K4t-V4t", "K2tG32-V8tG32s-bf16", "K8t-V2tG16-nibbles", "K4c-V2tG32-bf16", "K2c-V4c-gather", "K4c-V8c-dequant",
         "K8c-V4t-fold", "K16-V2c-splits"],
)  # fmt: skip
def test_codes_read_as_words_equal_bytes(kv, d, p, tuning, rng):
    """Quantized pools read as 32-bit words and turned back into their bytes where they are used (8-bit pools by
    default, every pool with `_variant="w32"`, none with "nw32"): token-axis column blocks, channel-axis pages in
    storage or token order, 8-bit pages, prefetched or not. The same bytes meet the same operations (`_same`)."""
    _same_as_base(rng, kv, d, p, 2, tuning, "nw32", "w32")


@pytest.mark.parametrize(
    "kv,d,p,tuning",
    [
        ((_spec(16), _spec(16)), 64, 16, dict(pages_per_block=1, parts=2)),
        ((_spec(4, group=128), _spec(4, group=128)), 128, 64, {}),
        ((_spec(2, group=64), _spec(2, group=64, sym=True)), 64, 16, dict(pages_per_block=1, parts=1)),
        ((_spec(8, group=64), _spec(2, group=16)), 64, 16, dict(pages_per_block=1, parts=1)),
        ((_spec(8, "channel", 32), _spec(4, group=64)), 64, 64, {}),
        ((_spec(4, "channel", 16), _spec(2, group=32)), 64, 16, STACKED | dict(pages_per_block=1)),
        ((_spec(16), _spec(2, "channel", 16, sym=True)), 64, 16, dict(pages_per_block=1, num_splits=3)),
    ],
    ids=["K16-V16-high", "K4t-V4t-p64", "K2t-V2ts-bf16", "K8t-V2tG16-bf16", "K8c-V4t-p64", "K4c-V2tG32-stacked",
         "K16-V2c-splits"],
)  # fmt: skip
def test_one_page_blocks_need_no_row_selects(kv, d, p, tuning, rng):
    """With one page a block, every block of the kernel's loop lies within the sequence's pages, so no row is masked
    (default; `_variant="vmask"` keeps the per-row selects): the same outputs, on pools whose every page holds random
    codes and scales (the kernel prefetches one block past each sequence's end, reading page 0 for INVALID). Not
    bit for bit in interpret mode: without the selects XLA:CPU orders some dots' sums differently (~1e-6 relative,
    as close to the reference as before)."""
    _same_as_base(rng, kv, d, p, 2, tuning, "vmask", "", exact=False)


def _same_as_base(rng, kv, d, p, hg, tuning, base_item, item, exact: bool = True):
    """The kernel with `_variant` item `item` added to the case's own variant gives the outputs of the kernel with
    `base_item` added ("" for none) on fresh random pools with ragged lengths including 0 (`_same`), and the
    reference's result at the precision's tolerance (`_check`, on the same call's outputs: two compiles a case)."""
    ks, vs = kv
    q, k, v, pt, nt = _case(rng, ks, vs, d=d, p=p, hg=hg, b=3, max_pages=4, lengths=[0, 4 * p, 3 * p])
    args = (q, *k, *v, pt, nt)
    tuning = dict(tuning)
    variant = tuning.pop("_variant", "")
    sm = _sm_scale(q)  # _check's scale
    base, new = (
        _kernel(*args, k_spec=ks, v_spec=vs, sm_scale=sm, _variant=",".join(x for x in (variant, it) if x), **tuning)
        for it in (base_item, item)
    )
    for a, b in zip(base, new, strict=True):
        _same(a, b, exact)
    _check(q, k, v, pt, nt, ks, vs, rtol=2e-2 if tuning.get("parts") == 1 else RTOL, outputs=new)


@pytest.mark.parametrize(
    "kv,d,p,tuning",
    [
        ((_spec(2, group=128), _spec(2, group=128)), 128, 16, {}),
        ((_spec(2, group=128), _spec(2, group=128)), 128, 64, dict(parts=1)),
        ((_spec(4, group=64), _spec(2, group=64, sym=True)), 64, 64, dict(parts=1, _variant="w32")),
        ((_spec(8, group=64), _spec(4, group=64)), 64, 16, dict(eight_bit="nibbles", softmax="running")),
        ((_spec(4, "channel", 16), _spec(2, group=128)), 128, 16, dict(parts=1, num_splits=3)),
        ((_spec(2, group=64), _spec(2, group=64)), 64, 16, {}),
        ((_spec(4, "channel", 32), _spec(2, group=32)), 128, 32, STACKED | dict(parts=1, _variant="fixedall")),
        ((_spec(4, "channel", 32), _spec(4, group=32, sym=True)), 128, 32, STACKED | dict(_variant="w32")),
        ((_spec(8, group=128), _spec(2, group=16)), 128, 16, dict(parts=1, _variant="novhalf")),
    ],
    ids=["K2t-V2t", "K2t-V2t-bf16", "K4t-V2ts-bf16-w32", "K8t-V4t-nibbles-running", "K4c-V2t-bf16-splits",
         "K2t-V2t-hd64", "K4c-V2tG32-vhalf-fixedall", "K4c-V4tG32s-high-w32", "K8t-V2tG16-bf16-novhalf"],
)  # fmt: skip
def test_joined_value_fields_equal_separate_ones(kv, d, p, tuning, rng):
    """Joined value fields (default for small value groups dequantized and for 2-bit values under 2- or 4-bit per-token
    keys, `_variant="vjoin"` for other layouts of one group per block): per-token values whose column blocks have fewer
    than 64 byte columns run 2 or 4 fields per dot (rows J * i + k), so that the value dots can be warpgroup MMAs:
    2-bit codes of 128-channel heads, all four fields of 64-channel heads, small value groups dequantized (in f16 at
    bf16 precision, in bf16 parts at "high" or without f16). The same products, summed the same way, as one dot per
    field (`_variant="novjoin"`; `_same`), and the reference's result (`_check`), with ragged lengths including 0.
    Joined fields of undequantized codes (default for 4/2 and 2/2) unpack from 16-bit lanes when compiled: from bytes
    they were wrong on the H200 (2026-12-05). Interpreted, to 1e-5 of the output's norm rather than bit for bit: a
    joined dot has 2 or 4 times the contraction length of a field's, and XLA:CPU blocks and orders such sums by the
    host's vector width (equal bit for bit on an AVX-512 host, 34 of 3,072 outputs 1 ulp-scale apart on an AVX2 AMD
    EPYC, 2026-12-07)."""
    _same_as_base(rng, kv, d, p, 4, tuning, "novjoin", "vjoin", exact=False)


@pytest.mark.parametrize(
    "kv,d,p,hg,tuning",
    [
        ((_spec(16), _spec(16)), 64, 16, 4, dict(pages_per_block=1)),
        ((_spec(16), _spec(16)), 128, 64, 8, {}),
        ((_spec(4, group=128), _spec(4, group=128)), 128, 64, 4, {}),
        ((_spec(2, group=128), _spec(2, group=128)), 128, 16, 1, {}),
        ((_spec(4, group=64), _spec(2, group=64)), 64, 16, 4, dict(parts=3)),
        ((_spec(8, group=64), _spec(8, group=64, sym=True)), 64, 16, 2, {}),
        ((_spec(8, group=64), _spec(4, group=32)), 64, 16, 4, dict(eight_bit="nibbles", softmax="running")),
        ((_spec(4, "channel", 32), _spec(2, group=32)), 64, 32, 4, dict(channel_keys="fold")),
        ((_spec(4, "channel", 16), _spec(4, group=16, sym=True)), 64, 16, 2, dict(channel_keys="dequant")),
        ((_spec(16), _spec(2, "channel", 16, sym=True)), 64, 16, 4, dict(pages_per_block=1, num_splits=3)),
        ((_spec(2, group=64), _spec(16)), 64, 16, 8, dict(_variant="novzero")),
        ((_spec(2, "channel", 32), _spec(2, group=32)), 128, 64, 4, {}),
        ((_spec(4, "channel", 16), _spec(4, group=64)), 64, 16, 2, STACKED | dict(_variant="spcols")),
        ((_spec(8, "channel", 32), _spec(16)), 64, 32, 2, dict(_variant="spcols,qselect")),
    ],
    ids=["K16-V16-P16", "K16-V16-P64-gqa8", "K4t-V4t", "K2t-V2t-gqa1", "K4t-V2t-parts3", "K8t-V8ts",
         "K8t-V4tG32-nibbles", "K4c-V2tG32-fold", "K4c-V4tG16s-dequant", "K16-V2cs-splits", "K2t-V16-novzero",
         "K2cG32-V2tG32-stacked", "K4c-V4t-stacked-sub-blocks", "K8c-V16-stacked-qselect"],
)  # fmt: skip
def test_probability_parts_side_by_side(kv, d, p, hg, tuning, rng):
    """At "high" (parts >= 2) where the GQA group fits `parts` times into the padded query rows, the query rows are
    repeated and probability part k sits in column group k, so one value dot does what one dot per part did; the
    wrapper adds the groups' outputs, and zero-point terms outside the dots are shared among the groups. The same
    products as one dot per part (`_variant="nopcols"`), up to float32 summation order and the lo x lo terms that
    come along (`_same`, not bit for bit), and the reference's result at RTOL, on every value layout: 16-bit,
    per-token of one or several groups (undequantized, dequantized, f16 operands), per-channel; and beside stacked
    per-channel keys (copies of the stacked columns: by default where the stacking plan leaves room, with
    `_variant="spcols"` by a plan that makes room; in token order or token sub-blocks, scales broadcast from block
    loads or selected per group)."""
    _same_as_base(rng, kv, d, p, hg, tuning, "nopcols", "", exact=False)


@pytest.mark.parametrize(
    "variant",
    [
        "",
        "loads",
        "nosoftmax",
        "novalues",
        "vtrans",
        "vrows",
        "krows0",
        "kgroup1",
        "kboth",
        "nocvt",
        "noex2",
        "nofma",
        "vcb16",
        "kgather",
        "qonce",
        "qselect",
        "vselect",
        "novhalf",
        "novzero",
        "w32",
        "nw32",
        "vjoin",
        "novjoin",
        "vmask",
        "nopcols",
        "spcols",
        "nospcols",
    ],
)
def test_kernel_and_its_ablation_variants_lower_for_an_h100(variant):
    """The compiled kernel, and each ablation variant benchmarks/attention.py can time (`_variant`), lowers to Triton
    for an abstract H100 for per-token and KIVI-layout pools: a Triton lowering failure otherwise shows only on a GPU
    (the "novalues" variant sliced a register tile, which Triton cannot)."""
    for ks, vs in [(_spec(4, group=128), _spec(4, group=128)), (_spec(4, "channel", 32), _spec(2, group=32))]:
        text = gpu_attention_lowered(ks, vs, _variant=variant)
        assert "triton" in text, (variant, ks, vs)


@pytest.mark.parametrize("precision", ["high", "bf16"])
@pytest.mark.parametrize(
    "kv",
    [(_spec(8, group=128), _spec(8, group=128, sym=True)), (_spec(8, group=128), _spec(8, group=32)),
     (_spec(4, "channel", 32), _spec(8, group=128))],
    ids=["K8t-V8t", "K8t-V8tG32", "K4c-V8t"],
)  # fmt: skip
def test_eight_bit_f16_lowers_for_an_h100(kv, precision):
    """`eight_bit="f16"` (whole-byte f16 operands, the value-scale pass and its float32 exponent arithmetic on
    scalars) lowers to Triton for an abstract H100, with per-token, small-group and stacked per-channel neighbours;
    so do small value groups dequantized in f16 (bf16 precision only), with either scale tiles, and both ways of
    reading codes."""
    assert "triton" in gpu_attention_lowered(*kv, eight_bit="nibbles", precision=precision)
    for variant in ("", "vselect", "novhalf", "w32", "nw32"):
        assert "triton" in gpu_attention_lowered(*kv, precision=precision, _variant=variant)


def test_defaults_take_the_timed_paths():
    """The defaults are the paths the H200 timed fastest (BENCHMARKS.md, 2026-12-05): each lowers to a kernel other
    than its A/B opposite's where it applies, and to the same kernel where it does not."""
    low = gpu_attention_lowered
    t4, t8, full = _spec(4, group=128), _spec(8, group=128), _spec(16)
    # 16-bit values of one-page blocks: the masked load, not the select, at bf16 precision and, with the probability
    # parts side by side, at "high"; without those (two value dots) the select
    assert low(full, full, precision="bf16") != low(full, full, precision="bf16", _variant="novzero")
    assert low(full, full) != low(full, full, _variant="novzero")
    assert low(full, full, _variant="nopcols") == low(full, full, _variant="nopcols,novzero")
    # Probability parts side by side at "high" (GQA 4 of the abstract case); nothing to do at bf16 precision; beside
    # stacked per-channel keys where their plan leaves room (2-bit keys here, as "spcols" would plan them; H100,
    # 2026-12-05), not by a plan that makes room (4-bit keys: "spcols" was slower there)
    assert low(t4, t4) != low(t4, t4, _variant="nopcols")
    assert low(t4, t4, precision="bf16") == low(t4, t4, precision="bf16", _variant="nopcols")
    c2 = (_spec(2, "channel", 32), _spec(2, group=32))
    assert low(*c2) == low(*c2, _variant="spcols") != low(*c2, _variant="nospcols") == low(*c2, _variant="nopcols")
    c4 = (_spec(4, "channel", 32), _spec(2, group=32))
    assert low(*c4) == low(*c4, _variant="nospcols") != low(*c4, _variant="spcols")
    # Codes read as words in layers with an 8-bit side (both pools), not in 4-bit layers
    assert low(t8, t4) != low(t8, t4, _variant="nw32")
    assert low(t4, t4) == low(t4, t4, _variant="nw32") != low(t4, t4, _variant="w32")
    # 8-bit codes as whole-byte f16 operands
    assert low(t8, t8) != low(t8, t8, eight_bit="nibbles")
    # Small value groups: block-loaded scales at both precisions, f16 dequantization at bf16 only
    kv = (_spec(4, "channel", 32), _spec(2, group=32))
    assert low(*kv) != low(*kv, _variant="vselect")
    assert low(*kv, precision="bf16") != low(*kv, precision="bf16", _variant="novhalf")
    assert low(*kv) == low(*kv, _variant="novhalf")


def test_auto_precision_is_bf16_for_per_channel_keys_only():
    """precision="auto" (the engine's default) resolves per layer: bf16 operands where the keys are per-channel
    quantized (KIVI), "high" for per-token and 16-bit keys; explicit choices pass through; anything else is an error
    that names the field."""
    chan, tok, full = _spec(4, "channel", 32), _spec(4, group=64), _spec(16)
    assert resolve_precision("auto", chan, _spec(2, group=32)) == "bf16"
    assert resolve_precision("auto", _spec(8, "channel", 32), full) == "bf16"
    assert resolve_precision("auto", tok, tok) == "high"
    assert resolve_precision("auto", full, _spec(2, "channel", 16)) == "high"  # per-channel values, 16-bit keys
    assert resolve_precision("high", chan, tok) == "high" and resolve_precision("bf16", tok, tok) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp32", tok, tok)
    q, k, v, pt, nt = _case(np.random.default_rng(0), tok, tok)
    with pytest.raises(ValueError, match="dispatcher"):  # the kernel takes resolved precisions only
        paged_attention(q, *k, *v, pt, nt, k_spec=tok, v_spec=tok, sm_scale=0.1, interpret=True, precision="auto")


@pytest.mark.parametrize(
    "kv,same_as",
    [((_spec(4, "channel", 32), _spec(2, group=32)), "bf16"), ((_spec(4, group=64), _spec(4, group=64)), "high")],
    ids=["K4c-V2tG32", "K4t-V4t"],
)
def test_auto_precision_runs_the_resolved_kernel(kv, same_as, rng):
    """Through the dispatcher, "auto" gives exactly the kernel result of the precision it resolves to (bit for bit in
    interpret mode), and that result equals the reference within that precision's tolerance."""
    q, k, v, pt, nt = _case(rng, *kv, hg=4, p=32, lengths=[3 * 32, 4 * 32])
    args = (q, *k, *v, pt, nt)
    kw = dict(k_spec=kv[0], v_spec=kv[1], sm_scale=0.125, backend="gpu", interpret=INTERPRET)
    auto = _run(dispatch, *args, **kw, precision="auto")
    want = _run(dispatch, *args, **kw, precision=same_as)
    _same(auto[0], want[0], exact=True)
    _same(auto[1], want[1], exact=True)
    ref, _ = _reference(*args, k_spec=kv[0], v_spec=kv[1], sm_scale=0.125)
    err = np.linalg.norm(np.asarray(auto[0]) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert (10 * RTOL < err < 2e-2) if same_as == "bf16" else err < RTOL, err
