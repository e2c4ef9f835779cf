"""Packed page write kernels (GPU Triton, TPU Mosaic) against `quantize_write_reference`: bit-exact codes, scales and
zero-points, pages of other sequences untouched, dest < 0 skipped.

Kernels run in interpret mode on CPU. KVTUNER_TEST_COMPILED=1 runs the GPU kernel compiled (on a real GPU), against
the reference evaluated on the CPU.
Equality is exact (byte for byte): the kernels compute the reference's float32 expressions in the same order, so any
difference is a bug, not rounding.
"""

from __future__ import annotations

import os
import re

if os.environ.get("KVTUNER_TEST_COMPILED") == "1":
    # On a GPU, XLA may drop the reference's f32 -> f16 -> f32 rounding of scales as "excess precision", so the
    # reference would quantize with unrounded scales while the kernel uses the stored ones (read before the backend
    # starts: run this file on its own, as the GPU check does).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import abstract_mesh

from kvtuner_jax import quant
from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout, tile_quant
from pallas_kernels.quantize_write import quantize_write, quantize_write_reference

COMPILED = os.environ.get("KVTUNER_TEST_COMPILED") == "1"
INTERPRET = {"gpu": not COMPILED, "tpu": True}


def _spec(bits, axis="token", group=64, sym=False, sdt="float16"):
    return KVSpec(bits=bits, axis=axis, group_size=group, symmetric=sym, scale_dtype=sdt)


# (spec, page_size, head_dim): every bit width, both axes, sym/asym, both scale dtypes, group < and = the full axis.
CASES = [
    (_spec(2, "token", 64), 16, 64),
    (_spec(2, "channel", 16, sym=True), 16, 64),
    (_spec(2, "channel", 8), 32, 64),
    (_spec(4, "token", 32, sdt="bfloat16"), 16, 64),
    (_spec(4, "channel", 32), 32, 128),
    (_spec(4, "token", 16, sym=True), 16, 64),
    (_spec(8, "token", 128, sym=True), 16, 128),
    (_spec(8, "channel", 16, sdt="bfloat16"), 16, 64),
    (_spec(16), 16, 64),
]


def _ids(c):
    s, p, d = c
    if not s.quantized:
        return f"b16-P{p}-D{d}"
    return f"b{s.bits}-{s.axis}-G{s.group_size}-{'sym' if s.symmetric else 'asym'}-{s.scale_dtype}-P{p}-D{d}"


def _pages(rng, h, m, p, d, dtype=jnp.bfloat16):
    # Per-channel offsets and scales (like real keys) so groups differ; one constant group and one NaN exercise the
    # EPS floor and the non-finite rule.
    x = rng.standard_normal((h, m, p, d)) * rng.uniform(0.2, 4.0, (1, 1, 1, d)) + rng.normal(0, 2, (1, 1, 1, d))
    x[0, 0, :, :8] = 1.5
    x[-1, -1, 3, 5] = np.nan
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _poisoned_pool(rng, spec, h, n, p, d):
    """A pool full of random bytes (as if earlier sequences wrote there)."""
    arrs = layout.allocate(spec, h, n, p, d)
    out = []
    for a in arrs:
        if a is None:
            out.append(None)
            continue
        raw = rng.integers(0, 256, size=a.size * a.dtype.itemsize, dtype=np.uint8)
        out.append(jnp.asarray(raw.view(a.dtype).reshape(a.shape)))
    return tuple(out)


def _reference(*args, spec):
    """`quantize_write_reference`, on the CPU when the kernel runs compiled: XLA's GPU backend may rewrite the
    reference's float32 expressions (division, fused rounding), its CPU backend evaluates them as written."""
    if not COMPILED:
        return quantize_write_reference(*args, spec=spec)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return quantize_write_reference(*jax.device_put(args, cpu), spec=spec)


def _bytes(a):
    return None if a is None else np.asarray(a).view(np.uint8)


def _assert_same_bytes(got, want):
    for name, g, w in zip(("codes", "scale", "zero"), got, want, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.shape == w.shape and g.dtype == w.dtype, name
            np.testing.assert_array_equal(_bytes(g), _bytes(w), err_msg=name)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_write_bit_exact_and_other_pages_untouched(backend, case, rng):
    spec, p, d = case
    h, n, m = 2, 7, 3
    pool = _poisoned_pool(rng, spec, h, n, p, d)
    before = [None if a is None else np.array(a) for a in pool]
    pages = _pages(rng, h, m, p, d)
    dest = jnp.array([5, -1, 2], jnp.int32)
    want = _reference(*pool, pages, dest, spec=spec)
    got = quantize_write(*pool, pages, dest, spec=spec, backend=backend, interpret=INTERPRET[backend])
    _assert_same_bytes(got, want)
    # Independently of the reference: every page but 5 and 2 is byte-for-byte what was there (the poison).
    keep = np.array([i not in (5, 2) for i in range(n)])
    for g, b in zip(got, before, strict=True):
        if g is not None:
            np.testing.assert_array_equal(_bytes(g)[:, keep], b.view(np.uint8)[:, keep])


# (case, rows, warps): the GPU kernel writing blocks of a page's tokens, each block its own program: a whole page of
# per-token codes; per-token codes in
# blocks of 8 and 4 rows; per-channel codes in blocks of one quantization group (2-bit: 4 code rows of 16 tokens) and
# of two (8-bit, G 16, bf16 scales); unquantized pages in blocks of 4; fewer warps
ROW_BLOCKS = [
    ((_spec(4, "token", 128), 64, 128), 64, 4),  # a whole page a program (the default for per-token pages: 16, 2 warps)
    (CASES[0], 8, 4),
    (CASES[3], 4, 2),
    ((_spec(2, "channel", 16, sym=True), 64, 64), 16, 4),
    ((_spec(8, "channel", 16, sdt="bfloat16"), 64, 64), 32, 1),
    (CASES[2], 8, 2),
    (CASES[-1], 4, 4),
]


@pytest.mark.parametrize("case,rows,warps", ROW_BLOCKS, ids=lambda x: _ids(x) if isinstance(x, tuple) else str(x))
def test_gpu_write_in_token_blocks_is_the_same(case, rows, warps, rng):
    """`rows` tokens a program (several programs a page): byte for byte the reference's write, other pages kept."""
    from pallas_kernels import quantize_write_gpu

    spec, p, d = case
    pool = _poisoned_pool(rng, spec, 2, 5, p, d)
    before = [None if a is None else np.array(a) for a in pool]
    pages = _pages(rng, 2, 2, p, d)
    dest = jnp.array([3, 0], jnp.int32)
    want = _reference(*pool, pages, dest, spec=spec)
    got = quantize_write_gpu.quantize_write(
        *pool, pages, dest, spec=spec, interpret=INTERPRET["gpu"], rows=rows, num_warps=warps
    )
    _assert_same_bytes(got, want)
    for g, b in zip(got, before, strict=True):
        if g is not None:
            np.testing.assert_array_equal(_bytes(g)[:, [1, 2, 4]], b.view(np.uint8)[:, [1, 2, 4]])


def test_gpu_write_refuses_token_blocks_it_cannot_write():
    from pallas_kernels import quantize_write_gpu

    pages, dest = jnp.ones((1, 1, 16, 64), jnp.bfloat16), jnp.zeros((1,), jnp.int32)
    for spec, rows, warps, match in (
        (_spec(4, "token", 16), 12, 4, "rows=12: expected a power of two dividing page_size=16"),
        (_spec(4, "token", 16), 32, 4, "rows=32: expected a power of two dividing page_size=16"),
        (_spec(2, "channel", 16), 8, 4, "multiple of group_size=16"),
        (_spec(2, "token", 16), 2, 4, "whole bytes"),
        (_spec(8, "token", 16), 8, 3, "num_warps=3"),
    ):
        pool = layout.allocate(spec, 1, 2, 16, 64)
        with pytest.raises(ValueError, match=re.escape(match)):
            quantize_write_gpu.quantize_write(*pool, pages, dest, spec=spec, rows=rows, num_warps=warps)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_all_dest_negative_writes_nothing(backend, rng):
    spec, p, d = _spec(4, "channel", 16), 16, 64
    pool = _poisoned_pool(rng, spec, 2, 4, p, d)
    before = [np.array(a) for a in pool]
    pages = _pages(rng, 2, 2, p, d)
    got = quantize_write(
        *pool, pages, jnp.array([-1, -7], jnp.int32), spec=spec, backend=backend, interpret=INTERPRET[backend]
    )
    for g, b in zip(got, before, strict=True):
        np.testing.assert_array_equal(_bytes(g), b.view(np.uint8))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_write_zero_pages_is_a_no_op(backend, rng):
    spec = _spec(8, "token", 64)
    pool = _poisoned_pool(rng, spec, 2, 3, 16, 64)
    got = quantize_write(
        *pool, jnp.zeros((2, 0, 16, 64)), jnp.zeros((0,), jnp.int32), spec=spec, backend=backend, interpret=True
    )
    _assert_same_bytes(got, pool)


def test_tpu_write_two_cores_no_races(rng):
    """Megacore: the "parallel" grid split over 2 simulated cores; the race detector sees no overlapping DMA writes
    (and does see one when two pages go to the same destination, so the check has teeth)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels import quantize_write_tpu

    spec, p, d = _spec(4, "channel", 16), 16, 64
    pool = layout.allocate(spec, 2, 6, p, d)
    pages = _pages(rng, 2, 4, p, d)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    for dest, racy in (([3, 0, -1, 5], False), ([3, 0, 3, 5], True)):  # pages 0 and 2 run on different cores
        dest = jnp.array(dest, jnp.int32)
        got = quantize_write_tpu.quantize_write(*pool, pages, dest, spec=spec, interpret=params)
        assert tpu_interpreter.races.races_found == racy
        if not racy:
            _assert_same_bytes(got, _reference(*pool, pages, dest, spec=spec))


@pytest.mark.parametrize(
    "backend,platform,kind", [("gpu", "cuda", "NVIDIA H100"), ("tpu", "tpu", "TPU v5 lite")], ids=["gpu", "tpu"]
)
def test_write_in_place_under_jit_donation(backend, platform, kind):
    """Compiled kernels write in place: lowered for the real platform under jit with the pool donated, every pool
    array is aliased to an output, the kernel's custom call aliases its pool operands, and nothing copies the pool."""
    spec, p, d = _spec(2, "token", 32), 16, 64
    pool = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in layout.allocate(spec, 2, 5, p, d)]

    def step(codes, scale, zero, pages, dest):
        return quantize_write(codes, scale, zero, pages, dest, spec=spec, backend=backend)

    with jax.sharding.use_abstract_mesh(abstract_mesh(kind, "gpu" if platform == "cuda" else platform)):
        text = (
            jax.jit(step, donate_argnums=(0, 1, 2))
            .trace(*pool, jax.ShapeDtypeStruct((2, 1, p, d), jnp.bfloat16), jax.ShapeDtypeStruct((1,), jnp.int32))
            .lower(lowering_platforms=(platform,))
            .as_text()
        )
    assert sorted(re.findall(r"tf\.aliasing_output = (\d+)", text)) == ["0", "1", "2"]
    assert len(re.findall(r"output_operand_alias<", text)) == 3
    assert "stablehlo.copy" not in text


def test_tile_quant_matches_quant_both_styles():
    """The shared tile functions alone (outside any kernel) reproduce quant.quantize + quant.pack + quant.dequantize
    bit for bit, in both the reshape (Triton) and mask/matmul (Mosaic) styles, incl. the unpack the attention uses."""
    rng = np.random.default_rng(3)
    for bits, axis, group, sym in ((2, "token", 16, False), (4, "channel", 8, True), (8, "token", 64, False),
                                   (2, "channel", 32, True), (4, "token", 32, False)):  # fmt: skip
        x = _pages(rng, 1, 1, 32, 64, jnp.float32)[0, 0]
        c, s, z = quant.quantize(x, bits, group, axis, sym, jnp.float16)
        pc = quant.pack(c, bits, quant.packed_axis(axis))
        for reshape in (True, False):
            kw = dict(bits=bits, group_size=group, axis=axis, symmetric=sym, reshape=reshape)

            @jax.jit
            def roundtrip(x, kw=kw):
                kc, ks, kz = tile_quant.quantize_tile(x, scale_dtype=jnp.float16, **kw)
                return (kc, ks, kz), tile_quant.dequantize_tile(kc, ks, kz, **kw)

            got, back = roundtrip(x)
            _assert_same_bytes(got, (pc, s, z))
            np.testing.assert_array_equal(np.asarray(back), np.asarray(quant.dequantize(c, s, z, bits, group, axis)))


@pytest.mark.parametrize("bits,group,sym,sdt", [(2, 16, False, "float16"), (4, 32, True, "bfloat16"),
                                                (2, 2, False, "bfloat16"), (4, 64, False, "float16"),
                                                (8, 32, True, "float16")])  # fmt: skip
def test_dequantize_fields_are_the_reference_channels(bits, group, sym, sdt):
    """Field j of a token-axis page (the TPU attention's in-place unpacking) is bit for bit quant.dequantize's
    channels j::per, for groups spanning whole bytes (expanded once for all fields) and groups of 2 channels in 4-code
    bytes (expanded per field), both scale dtypes."""
    rng = np.random.default_rng(bits * 100 + group)
    x = _pages(rng, 1, 1, 32, 64, jnp.float32)[0, 0] * 3.0
    c, s, z = quant.quantize(x, bits, group, "token", sym, jnp.dtype(sdt))
    pc = quant.pack(c, bits, quant.packed_axis("token"))
    want = np.asarray(quant.dequantize(c, s, z, bits, group, "token"))
    got = jax.jit(lambda pc, s, z: tile_quant.dequantize_fields(pc, s, z, bits=bits, group_size=group, symmetric=sym))(
        pc, s, z
    )
    per = 8 // bits
    assert len(got) == per
    for j, f in enumerate(got):
        np.testing.assert_array_equal(np.asarray(f), want[:, j::per])


def test_select_dot_is_exact():
    """The TPU tile math's selection matmuls as single-pass bf16 dots: f16 values (extremes and subnormals included)
    and bf16 values come through a 0/1 expansion exactly, and codes through the packing weights, against float64."""
    rng = np.random.default_rng(0)
    edge = np.array([65504.0, -65504.0, 6e-8, -6.1e-5, 1.0009765625, 0.0, 2049.0, 3.140625], np.float16)
    for dtype in (np.float16, jnp.bfloat16):
        v = np.concatenate([edge.astype(np.float32), rng.standard_normal(40).astype(np.float32) * 100])
        vals = jnp.asarray(v.reshape(8, 6), dtype)  # [rows, groups]
        onehot = np.kron(np.eye(6), np.ones((1, 5)))  # [groups, 30]: each group over 5 columns
        got = np.asarray(tile_quant.select_dot(vals, jnp.asarray(onehot, jnp.float32)))
        want = np.asarray(vals, np.float64) @ onehot
        np.testing.assert_array_equal(got, want)
        got_t = np.asarray(tile_quant.select_dot(jnp.asarray(onehot.T, jnp.float32), vals.T, x_is_a=False))
        np.testing.assert_array_equal(got_t, want.T)
    codes = rng.integers(0, 4, (16, 64)).astype(np.int32)
    packed = np.asarray(tile_quant.select_dot(jnp.asarray(codes), tile_quant.pack_matrix(64, 2)))
    np.testing.assert_array_equal(packed, codes.astype(np.float64) @ np.asarray(tile_quant.pack_matrix(64, 2)))
    assert packed.max() > 128  # the packed bytes use their high bits


def test_round_div_is_exact_at_ties_and_elsewhere():
    """quant.round_div against float64 numpy: exact quotient rounding, ties to even.

    Oracle: d / s in float64 is exact at ties (d = (k + 1/2) s is built exactly) and elsewhere at least 2^-40 away
    from a tie (d has 24 significant bits, s 11), far beyond float64's error, so np.round (ties to even) is exact.
    One scale per row, broadcast like a group's: XLA then multiplies by its reciprocal instead of dividing (on the
    CPU that flips ~6% of these ties for a plain round(d / s)).
    """
    rng = np.random.default_rng(7)
    for sdt in (np.float16, jnp.bfloat16):
        s = rng.uniform(1e-3, 8.0, (1000, 1)).astype(np.float32).astype(sdt).astype(np.float32)
        k = rng.integers(-260, 260, (1000, 8)).astype(np.float32)
        ties = ((k + 0.5) * s).astype(np.float32)  # exact: <= 10 + 11 significant bits
        near = np.nextafter(ties, np.float32(np.inf) * rng.choice([-1, 1], ties.shape)).astype(np.float32)
        rand = (rng.uniform(-300, 300, ties.shape) * s).astype(np.float32)
        d = np.concatenate([ties, near, rand], axis=1)
        assert np.array_equal((k + 0.5) * s.astype(np.float64), ties.astype(np.float64))  # the ties really are ties
        want = np.round(np.clip(d.astype(np.float64) / s.astype(np.float64), -300, 300))
        got = np.asarray(jax.jit(quant.round_div)(jnp.asarray(d), jnp.asarray(s)))
        np.testing.assert_array_equal(got, want)


def test_quantize_rounds_exact_ties_to_even():
    """A group built so that codes land exactly on k + 1/2: the reference must round those to even."""
    # bf16 scale 0.9375 = 15/16 and zero -6.96875: x = zero + (k + 1/2) * scale is exact in bf16 for these k.
    zero, scale = -6.96875, 0.9375
    ks = np.array([0, 1, 2, 7, 10, 13], np.float64)
    x = np.full(32, 0.0)
    x[: len(ks)] = zero + (ks + 0.5) * scale
    x[-2], x[-1] = zero, zero + 15 * scale  # the group's min and max fix the scale at range / 15
    codes, s, z = quant.quantize(jnp.asarray(x[None], jnp.bfloat16), 4, 32, "token", False, jnp.bfloat16)
    assert float(s[0, 0]) == scale and float(z[0, 0]) == zero
    np.testing.assert_array_equal(np.asarray(codes[0, : len(ks)]), np.round(ks + 0.5))  # ties to even


def test_gpu_write_lowers_to_triton():
    """The compiled GPU path (Triton lowering) lowers on CPU for an abstract H100."""
    from pallas_kernels import quantize_write_gpu

    mesh = abstract_mesh("NVIDIA H100", "gpu")
    for spec, p, d in (CASES[1], CASES[3], CASES[-1]):
        pool = [
            None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in layout.allocate(spec, 2, 4, p, d)
        ]
        f = lambda c, s, z, pg, dst, spec=spec: quantize_write_gpu.quantize_write(c, s, z, pg, dst, spec=spec)
        with jax.sharding.use_abstract_mesh(mesh):
            text = (
                jax.jit(f)
                .trace(*pool, jax.ShapeDtypeStruct((2, 3, p, d), jnp.bfloat16), jax.ShapeDtypeStruct((3,), jnp.int32))
                .lower(lowering_platforms=("cuda",))
                .as_text()
            )
        assert "triton" in text


def test_gpu_rejects_non_power_of_two_shapes():
    from pallas_kernels import quantize_write_gpu

    spec = _spec(4, "token", 16)
    pool = layout.allocate(spec, 1, 2, 16, 48)
    with pytest.raises(ValueError, match="powers of two"):
        quantize_write_gpu.quantize_write(*pool, jnp.zeros((1, 1, 16, 48)), jnp.zeros((1,), jnp.int32), spec=spec)


def test_auto_backend_writes_unsupported_shapes_with_the_reference(rng, monkeypatch):
    """head_dim 48 on a GPU machine: "auto" writes that layer with the reference (bit-identical), instead of failing."""
    import pallas_kernels.paged_attention as pa

    spec = _spec(4, "token", 16)
    pool = layout.allocate(spec, 2, 4, 16, 48)
    pages, dest = _pages(rng, 2, 2, 16, 48), jnp.asarray([3, 1], jnp.int32)
    monkeypatch.setattr(pa, "resolve_backend", lambda b: "gpu" if b == "auto" else b)
    got = quantize_write(*pool, pages, dest, spec=spec, backend="auto", interpret=True)
    want = _reference(*pool, pages, dest, spec=spec)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ValueError, match="powers of two"):
        quantize_write(*pool, pages, dest, spec=spec, backend="gpu", interpret=True)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_groups_too_wide_for_fp16_scales_saturate_like_the_reference(backend, sym, rng):
    """Values of +-2e5 at 2 bits: range / 3 and the minimum exceed fp16's 65504. The reference clamps scale and zero
    to the dtype's range (codes clip instead of an inf scale); the kernels must write the same bytes."""
    spec, p, d = _spec(2, "token", 32, sym=sym), 16, 64
    pool = layout.allocate(spec, 2, 4, p, d)
    pages = jnp.asarray(rng.uniform(-2e5, 2e5, (2, 2, p, d)).astype(np.float32)).astype(jnp.bfloat16)
    dest = jnp.array([3, 0], jnp.int32)
    want = _reference(*pool, pages, dest, spec=spec)
    assert np.all(np.isfinite(np.asarray(want[1], np.float32)))  # the reference saturates
    got = quantize_write(*pool, pages, dest, spec=spec, backend=backend, interpret=INTERPRET[backend])
    _assert_same_bytes(got, want)
