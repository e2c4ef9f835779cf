"""kvtuner_jax.quant (the numerics oracle) against an independent float64 numpy implementation written here.

What is proved:
- codes, scales and zero-points equal the float64 reference element for element, for every (bits, symmetric, axis,
  group size) and three input distributions (normal, heavy-tailed, outlier channels like real keys);
- reconstruction error is at most scale/2 inside the representable range (plus float32 rounding);
- pack/unpack are inverse, LSB first; edge inputs (constant group, huge outlier, bf16/fp16/fp32, NaN/Inf) are finite
  and leave other groups alone.

Why equality is not total: quant.py works in float32, the reference in float64. Two quantities are rounded: the scale
(to fp16/bf16) and (x - zero) / scale (to an integer). Where the exact float64 value lies within 1e-3 (in units of the
rounding step) of a half-way point, float32's error (about 2.4e-7 relative, i.e. < 6e-4 steps for the largest
values) can legitimately flip the result; those elements are excluded and we assert they are rare (assert_rare).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kvtuner_jax import quant

TIE = 1e-3  # half-way band (in rounding steps) where float32 and float64 may legitimately disagree


def assert_rare(mask: np.ndarray, what: str, limit: float = 0.005) -> None:
    """Excluded near-ties must be rare: for float32 data about 2 * TIE = 0.2% are expected; allow 0.5% plus a few for
    small samples (a systematic mismatch hidden as "ties" would be far above this)."""
    assert mask.sum() <= limit * mask.size + 5, f"too many near-tie {what}: {mask.sum()} of {mask.size}"


# (significand bits incl. the implicit one, smallest normal exponent) of the 16-bit scale dtypes
FLOAT_FORMATS = {"float16": (11, -14), "bfloat16": (8, -126)}
JNP_SCALE = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}
HEADS, T, D = 2, 64, 64


# ------------------------------------------------------------------------------------------------ float64 reference


def round_to_format(v: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Rounds float64 `v` to the 16-bit float format (round half to even, subnormals included), in float64.

    Returns (rounded, near_tie): near_tie marks values within TIE steps of a half-way point.
    """
    p, emin = FLOAT_FORMATS[fmt]
    a = np.abs(v)
    _, ex = np.frexp(a)  # a = m * 2^ex, m in [0.5, 1): floor(log2 a) = ex - 1
    e = np.maximum(ex - 1, emin)
    step = np.ldexp(1.0, e - (p - 1))
    t = a / step  # exact: division by a power of two
    frac = t - np.floor(t)
    return np.sign(v) * np.round(t) * step, np.abs(frac - 0.5) < TIE


def group_view(x: np.ndarray, g: int, axis: str) -> tuple[np.ndarray, int]:
    """[H, T, D] -> grouped view and the axis holding one group's members."""
    h, t, d = x.shape
    if axis == "token":
        return x.reshape(h, t, d // g, g), 3
    return x.reshape(h, t // g, g, d), 2


def reference_scale_zero(x: np.ndarray, bits: int, g: int, axis: str, symmetric: bool, fmt: str):
    """Exact float64 scale (before rounding), rounded scale, its near-tie mask, and the rounded zero (or None)."""
    gv, ax = group_view(x.astype(np.float64), g, axis)
    if symmetric:
        exact = np.maximum(np.abs(gv).max(ax), quant.EPS) / (2 ** (bits - 1) - 1)
        zero = None
    else:
        mn, mx = gv.min(ax), gv.max(ax)
        exact = np.maximum(mx - mn, quant.EPS) / (2**bits - 1)
        zero, _ = round_to_format(mn, fmt)  # mn is exact, so its rounding is never ambiguous
    scale, near = round_to_format(exact, fmt)
    return exact, scale, near, zero


def reference_codes(x: np.ndarray, bits: int, g: int, axis: str, symmetric: bool, scale, zero):
    """Codes from the given (already rounded) per-group scale/zero, and the near-tie mask, both [H, T, D]."""
    gv, ax = group_view(x.astype(np.float64), g, axis)
    s = np.expand_dims(scale.astype(np.float64), ax)
    if symmetric:
        u = gv / s
        offset = 2 ** (bits - 1)
    else:
        u = (gv - np.expand_dims(zero.astype(np.float64), ax)) / s
        offset = 0
    frac = u - np.floor(u)
    q = np.clip(np.round(u) + offset, 0, 2**bits - 1)  # np.round: half to even, as jnp.round
    return q.reshape(x.shape).astype(np.uint8), (np.abs(frac - 0.5) < TIE).reshape(x.shape)


def make_input(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[H, T, D] float32 test data."""
    if kind == "normal":
        x = rng.standard_normal((HEADS, T, D))
    elif kind == "heavy":  # Student t, 2 degrees of freedom: occasional values 10-100x the typical one
        x = rng.standard_t(2.0, (HEADS, T, D))
    else:  # keys: per-channel offsets, a few channels 20-50x larger (why KIVI groups keys per channel)
        x = rng.standard_normal((HEADS, T, D)) + rng.normal(0, 2, (HEADS, 1, D))
        ch = rng.choice(D, 4, replace=False)
        x[..., ch] *= rng.uniform(20, 50, 4)
    return (x * rng.uniform(0.05, 5)).astype(np.float32)


GRID = list(itertools.product((2, 4, 8), (False, True), ("token", "channel"), (8, 32, 64)))
GRID_IDS = [f"b{b}-{'sym' if s else 'asym'}-{a}-G{g}" for b, s, a, g in GRID]


def check_against_reference(x: np.ndarray, bits, g, axis, symmetric, fmt="float16", rare=0.005):
    """Asserts quant.quantize(x) matches the float64 reference; returns (codes, scale, zero) from quant.py.

    rare: the allowed fraction of excluded near-ties (see assert_rare).
    """
    codes, scale, zero = quant.quantize(jnp.asarray(x), bits, g, axis, symmetric, JNP_SCALE[fmt])
    codes = np.asarray(codes)
    scale = np.asarray(scale.astype(jnp.float32)).astype(np.float64)
    zero = None if zero is None else np.asarray(zero.astype(jnp.float32)).astype(np.float64)
    xr = np.asarray(jnp.asarray(x).astype(jnp.float32))  # what quant.py sees (bf16/fp16 inputs are exact in f32)
    exact, ref_scale, near, ref_zero = reference_scale_zero(xr, bits, g, axis, symmetric, fmt)

    # Scales: equal except near a rounding half-way point, where quant.py's must still be a neighbour of the exact
    # value (within one step of the format).
    assert_rare(near, "scales", rare)
    np.testing.assert_array_equal(scale[~near], ref_scale[~near])
    p, _ = FLOAT_FORMATS[fmt]
    assert np.all(np.abs(scale[near] - exact[near]) <= np.abs(exact[near]) * 2.0 ** (1 - p))
    if symmetric:
        assert zero is None
    else:
        np.testing.assert_array_equal(zero, ref_zero)

    # Codes from the scale quant.py stored (identical to the reference's except at the rare near-ties above).
    ref_codes, tie = reference_codes(xr, bits, g, axis, symmetric, np.where(near, scale, ref_scale), ref_zero)
    assert_rare(tie, "codes", rare)
    mismatch = (codes != ref_codes) & ~tie
    assert not mismatch.any(), f"{mismatch.sum()} codes differ, first at {np.argwhere(mismatch)[0]}"
    assert codes.max() <= 2**bits - 1
    return codes, scale, zero


# ------------------------------------------------------------------------------------------------ tests


def test_reference_rounding_matches_numpy_and_ml_dtypes(rng):
    """The float64 rounding written above agrees with numpy's float16 and ml_dtypes' bfloat16 casts."""
    v = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.uniform(-7, 4, 5000), [0.0, 1e-7, 65504.0]])
    r16, _ = round_to_format(v, "float16")
    np.testing.assert_array_equal(r16, v.astype(np.float16).astype(np.float64))
    v32 = v.astype(np.float32).astype(np.float64)  # f32 -> bf16 is a single rounding in ml_dtypes
    rbf, _ = round_to_format(v32, "bfloat16")
    np.testing.assert_array_equal(rbf, v32.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64))


@pytest.mark.parametrize("bits,symmetric,axis,g", GRID, ids=GRID_IDS)
def test_codes_match_float64_reference(bits, symmetric, axis, g, rng):
    for kind in ("normal", "heavy", "outliers"):
        check_against_reference(make_input(kind, rng), bits, g, axis, symmetric)


@pytest.mark.parametrize("bits,symmetric,axis", list(itertools.product((2, 4, 8), (False, True), ("token", "channel"))))
def test_codes_match_reference_bfloat16_scales(bits, symmetric, axis, rng):
    for kind in ("normal", "outliers"):
        check_against_reference(make_input(kind, rng), bits, 32, axis, symmetric, fmt="bfloat16")


def _range_excess(x, scale, zero, bits, g, axis, symmetric):
    """Distance from each x to the representable interval of its group (0 inside), float64 [H, T, D]."""
    s = np.asarray(quant._expand(jnp.asarray(scale), g, axis)).astype(np.float64)
    if symmetric:
        half = 2 ** (bits - 1)
        lo, hi = -half * s, (half - 1) * s
    else:
        z = np.asarray(quant._expand(jnp.asarray(zero), g, axis)).astype(np.float64)
        lo, hi = z, z + (2**bits - 1) * s
    return np.maximum(lo - x, 0) + np.maximum(x - hi, 0), s, np.maximum(np.abs(lo), np.abs(hi))


@pytest.mark.parametrize("bits,symmetric,axis,g", GRID, ids=GRID_IDS)
def test_reconstruction_error_within_half_step(bits, symmetric, axis, g, rng):
    for kind in ("normal", "heavy", "outliers"):
        x = make_input(kind, rng)
        codes, scale, zero = quant.quantize(jnp.asarray(x), bits, g, axis, symmetric)
        xh = np.asarray(quant.dequantize(codes, scale, zero, bits, g, axis)).astype(np.float64)
        excess, s, bound = _range_excess(x.astype(np.float64), scale, zero, bits, g, axis, symmetric)
        # Inside the representable range the error is at most half a step; outside it (only because scale/zero were
        # rounded to fp16) add the distance to the range. float32 dequant (q * s + z) adds a few ulp of the range's
        # magnitude: 1e-6 relative covers it.
        err = np.abs(xh - x)
        assert np.all(err <= s / 2 + excess + 1e-6 * bound + 1e-12)
        # fp16 rounding of scale and zero moves the range ends by at most ~2^-10 of the group's magnitude.
        gv, ax = group_view(np.abs(x), g, axis)
        gmax = np.asarray(quant._expand(jnp.asarray(gv.max(ax)), g, axis))
        assert np.all(excess <= 2.0**-9 * gmax)


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("axis", (0, 1, -1))
def test_pack_unpack_identity(bits, axis, rng):
    codes = rng.integers(0, 2**bits, (8, 16, 32)).astype(np.uint8)
    packed = quant.pack(jnp.asarray(codes), bits, axis)
    assert packed.dtype == jnp.uint8
    assert packed.shape[axis] == codes.shape[axis] * bits // 8
    np.testing.assert_array_equal(np.asarray(quant.unpack(packed, bits, axis)), codes)


def test_pack_is_lsb_first():
    # Hand-computed: 2-bit codes [1, 2, 3, 0] -> 1 | 2<<2 | 3<<4 | 0<<6 = 57; 4-bit [0xA, 0x3] -> 0x3A.
    assert np.asarray(quant.pack(jnp.array([1, 2, 3, 0], jnp.uint8), 2)).tolist() == [57]
    assert np.asarray(quant.pack(jnp.array([0xA, 0x3], jnp.uint8), 4)).tolist() == [0x3A]
    assert np.asarray(quant.unpack(jnp.array([57], jnp.uint8), 2)).tolist() == [1, 2, 3, 0]


@pytest.mark.parametrize("bits,symmetric", list(itertools.product((2, 4, 8), (False, True))))
@pytest.mark.parametrize("axis", ("token", "channel"))
def test_constant_group_and_huge_outlier_are_finite(bits, symmetric, axis, rng):
    x = make_input("normal", rng)
    g = 32
    # group 0 of head 0 constant; group 1 holds one 1e4 outlier
    if axis == "token":
        x[0, 0, :g] = 3.7
        x[0, 1, g + 5] = 1e4
    else:
        x[0, :g, 0] = 3.7
        x[0, g + 5, 1] = 1e4
    codes, scale, zero = check_against_reference(x, bits, g, axis, symmetric)
    s16 = jnp.asarray(scale, jnp.float16)
    z16 = None if zero is None else jnp.asarray(zero, jnp.float16)
    xh = np.asarray(quant.dequantize(jnp.asarray(codes), s16, z16, bits, g, axis))
    assert np.all(np.isfinite(xh)) and np.all(scale > 0)
    const = xh[0, 0, :g] if axis == "token" else xh[0, :g, 0]
    # constant group: scale is EPS/qmax (or |3.7|/(2^(b-1)-1) symmetric); error is fp16 rounding of 3.7 or a step
    assert np.all(np.abs(const - 3.7) <= 3.7 * 2.0**-10 + scale.max() / 2)
    out = xh[0, 1, g + 5] if axis == "token" else xh[0, g + 5, 1]
    assert abs(out - 1e4) <= 1e4 * 2.0**-9  # the outlier sets the range, so it is an end point: fp16 accuracy


@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16, jnp.float32))
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_input_dtypes(dtype, bits, rng):
    x = np.asarray(jnp.asarray(make_input("outliers", rng)).astype(dtype))
    # Inputs with 8- or 11-bit significands make group ranges with few significant bits, so scales sit near fp16
    # half-way points far more often than for float32 data (e.g. 8 of 256 groups): allow up to 10% excluded there.
    rare = 0.005 if dtype == jnp.float32 else 0.1
    for axis in ("token", "channel"):
        check_against_reference(x, bits, 32, axis, False, rare=rare)
        y = quant.fake_quantize(jnp.asarray(x), bits, 32, axis)
        assert y.dtype == dtype and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("axis", ("token", "channel"))
def test_huge_finite_group_saturates_instead_of_nan(axis, rng):
    # A float32 group spanning 2e6 needs a 2-bit scale of 6.7e5 > fp16 max: quant.py saturates scale/zero instead of
    # producing inf (and then NaN) values.
    x = make_input("normal", rng)
    if axis == "token":
        x[1, 3, :2] = (-1e6, 1e6)
    else:
        x[1, :2, 3] = (-1e6, 1e6)
    y = np.asarray(quant.fake_quantize(jnp.asarray(x), 2, 32, axis))
    assert np.all(np.isfinite(y))
    other = np.ones(x.shape, bool)
    if axis == "token":
        other[1, 3, :32] = False
    else:
        other[1, :32, 3] = False
    np.testing.assert_array_equal(y[other], np.asarray(quant.fake_quantize(jnp.asarray(x * other), 2, 32, axis))[other])


@pytest.mark.parametrize("bits,symmetric", list(itertools.product((2, 4, 8), (False, True))))
@pytest.mark.parametrize("axis", ("token", "channel"))
def test_non_finite_quantized_as_zero_other_groups_unaffected(bits, symmetric, axis, rng):
    x = make_input("normal", rng)
    bad = x.copy()
    pos = [(0, 5, 7), (1, 40, 60), (1, 41, 3)]
    for p, v in zip(pos, (np.nan, np.inf, -np.inf), strict=True):
        bad[p] = v
    zeroed = x.copy()
    for p in pos:
        zeroed[p] = 0.0
    c_bad, s_bad, z_bad = quant.quantize(jnp.asarray(bad), bits, 16, axis, symmetric)
    c_ref, s_ref, z_ref = quant.quantize(jnp.asarray(zeroed), bits, 16, axis, symmetric)
    # Non-finite -> exactly as if 0 was written there:
    np.testing.assert_array_equal(np.asarray(c_bad), np.asarray(c_ref))
    np.testing.assert_array_equal(np.asarray(s_bad), np.asarray(s_ref))
    assert np.all(np.isfinite(np.asarray(quant.dequantize(c_bad, s_bad, z_bad, bits, 16, axis))))
    # ... and every group without a non-finite element is unchanged from quantizing the clean input.
    c_clean = np.asarray(quant.quantize(jnp.asarray(x), bits, 16, axis, symmetric)[0])
    touched = np.zeros(x.shape, bool)
    for h, t, d in pos:
        if axis == "token":
            touched[h, t, d // 16 * 16 : d // 16 * 16 + 16] = True
        else:
            touched[h, t // 16 * 16 : t // 16 * 16 + 16, d] = True
    np.testing.assert_array_equal(np.asarray(c_bad)[~touched], c_clean[~touched])
    check_against_reference(zeroed, bits, 16, axis, symmetric)
