"""Reference quantization numerics (pure jnp): the oracle every kernel is tested against.

Written for clarity, not speed. The contract is DESIGN.md's "Numerics contract":

- bits b in {2, 4, 8}; 16 means "stored unquantized" and never reaches these functions.
- Asymmetric: per group `mn = min(x)`, `scale = max(max(x) - mn, EPS) / (2^b - 1)`,
  `q = clip(round((x - mn) / scale), 0, 2^b - 1)`, `x_hat = q * scale + mn`.
- Symmetric: `scale = max(max|x|, EPS) / (2^(b-1) - 1)`, `q = clip(round(x / scale) + 2^(b-1), 0, 2^b - 1)`,
  `x_hat = (q - 2^(b-1)) * scale`.
- Scale and zero-point (`mn`) are stored in a 16-bit float (`scale_dtype`). They are rounded to that dtype *first* and
  the codes are computed from the rounded values, so what is stored is exactly what the codes were made against.
- Rounding is round-half-to-even of the exact quotient (`round_div`): `q` is the integer nearest to the real number
  `d / scale`, where `d = x - mn` (or `x`) is the float32 difference and `scale` the stored 16-bit value; ties go to
  even. XLA does not promise a correctly rounded float32 division (on CPU and GPU it may multiply by a reciprocal),
  and with 16-bit scales exact ties are common, so a plain `round(d / scale)` would differ between backends.
- `scale` is the range times the float32 constant `1 / (2^b - 1)` (`1 / (2^(b-1) - 1)`), a multiplication, so it is
  the same on every backend, then rounded to the scale dtype.
- Non-finite inputs (NaN, +-Inf) are quantized as if they were 0. A NaN therefore cannot poison its group's scale,
  and groups are independent, so nothing else is affected either. (A model producing NaN keys is broken anyway; the
  cache must not turn one bad element into a bad sequence.)
- Scale and zero-point saturate at the scale dtype's largest finite value, so a finite group wider than that
  (e.g. a range above 3 * 65504 at 2 bits with fp16 scales) gives clipped but finite values, never NaN.

Group axes, for an array laid out `[..., tokens, channels]`:
- `"token"`: groups of G consecutive channels of one token (scale shape `[..., tokens, channels // G]`).
- `"channel"`: groups of G consecutive tokens of one channel (scale shape `[..., tokens // G, channels]`).

Packing: 8 // b codes per uint8, least significant bits first, along the grouped axis (channels for "token",
tokens for "channel").
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np

Axis = Literal["token", "channel"]

QUANT_BITS = (2, 4, 8)
EPS = 1e-4  # floor on a group's range, so a constant group gets a finite, nonzero scale


def inv_levels(bits: int, symmetric: bool) -> np.float32:
    """The float32 constant a group's range (asymmetric) or absmax (symmetric) is multiplied by to give its scale."""
    return np.float32(1.0 / (2 ** (bits - 1) - 1 if symmetric else 2**bits - 1))


def round_div(d: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    """round(d / s) with ties to even, exactly, for float32 d and positive s holding a 16-bit float; float32 result.

    The quotient (any float32 division, even one a few ulps off) only picks the candidate k = floor(d / s); the
    rounding is decided by comparing d with (k + 1/2) * s, a product that is exact in float32 (k + 1/2 has at most
    10 significant bits for |k| <= 300, s at most 11). Quotients beyond +-300 are clipped first: every caller clips
    the codes to at most 255 afterwards. Elementwise jnp only, so the Pallas kernels use it unchanged.
    """
    k = jnp.floor(jnp.clip(d / s, -300.0, 300.0))
    t = (k + 0.5) * s
    odd = k - 2.0 * jnp.floor(k * 0.5)  # 1.0 when k is odd
    return k + jnp.where(d > t, 1.0, jnp.where(d < t, 0.0, odd))


def _check(bits: int, axis: str) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits} is not one of {QUANT_BITS} (16 means unquantized and is not quantized)")
    if axis not in ("token", "channel"):
        raise ValueError(f"axis={axis!r} is not 'token' or 'channel'")


def _grouped(x: jnp.ndarray, group_size: int, axis: Axis) -> jnp.ndarray:
    """[..., T, D] -> [..., T, D/G, G] (token) or [..., T/G, G, D] (channel)."""
    *lead, t, d = x.shape
    if axis == "token":
        if d % group_size:
            raise ValueError(f"group_size={group_size} does not divide the channel axis ({d})")
        return x.reshape(*lead, t, d // group_size, group_size)
    if t % group_size:
        raise ValueError(f"group_size={group_size} does not divide the token axis ({t})")
    return x.reshape(*lead, t // group_size, group_size, d)


def _group_axis(axis: Axis) -> int:
    return -1 if axis == "token" else -2


def quantize(
    x: jnp.ndarray,
    bits: int,
    group_size: int,
    axis: Axis = "token",
    symmetric: bool = False,
    scale_dtype=jnp.float16,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """Quantizes `x` ([..., T, D], any float dtype) in groups.

    Returns `(codes, scale, zero)`: codes uint8 `[..., T, D]` (unpacked, values in [0, 2^b)); scale and zero in
    `scale_dtype` with the group shape (`[..., T, D/G]` for "token", `[..., T/G, D]` for "channel"); zero is None when
    symmetric.
    """
    _check(bits, axis)
    xf = x.astype(jnp.float32)
    xf = jnp.where(jnp.isfinite(xf), xf, 0.0)
    g = _grouped(xf, group_size, axis)
    ga = _group_axis(axis)
    qmax = 2**bits - 1
    # Clamp to the scale dtype's finite range: a finite group too wide for fp16 then saturates (its codes clip)
    # instead of getting an inf scale and NaN values. A no-op for any group whose range/qmax fits.
    fmax = float(jnp.finfo(scale_dtype).max)
    if symmetric:
        half = 2 ** (bits - 1)
        amax = jnp.max(jnp.abs(g), axis=ga, keepdims=True)
        scale = jnp.minimum(jnp.maximum(amax, EPS) * inv_levels(bits, True), fmax).astype(scale_dtype)
        q = jnp.clip(round_div(g, scale.astype(jnp.float32)) + half, 0, qmax)
        zero = None
    else:
        mn = jnp.min(g, axis=ga, keepdims=True)
        mx = jnp.max(g, axis=ga, keepdims=True)
        scale = jnp.minimum(jnp.maximum(mx - mn, EPS) * inv_levels(bits, False), fmax).astype(scale_dtype)
        zero = jnp.clip(mn, -fmax, fmax).astype(scale_dtype)
        q = jnp.clip(round_div(g - zero.astype(jnp.float32), scale.astype(jnp.float32)), 0, qmax)
    codes = q.astype(jnp.uint8).reshape(x.shape)
    scale = jnp.squeeze(scale, ga)
    zero = None if zero is None else jnp.squeeze(zero, ga)
    return codes, scale, zero


def _expand(s: jnp.ndarray, group_size: int, axis: Axis) -> jnp.ndarray:
    """Group-shaped scale -> element shape, by repeating each group value G times along the grouped axis."""
    return jnp.repeat(s, group_size, axis=_group_axis(axis))


def dequantize(
    codes: jnp.ndarray,
    scale: jnp.ndarray,
    zero: jnp.ndarray | None,
    bits: int,
    group_size: int,
    axis: Axis = "token",
    dtype=jnp.float32,
) -> jnp.ndarray:
    """Inverse of `quantize`: unpacked uint8 codes `[..., T, D]` -> values `[..., T, D]` in `dtype`."""
    _check(bits, axis)
    q = codes.astype(jnp.float32)
    s = _expand(scale.astype(jnp.float32), group_size, axis)
    if zero is None:
        out = (q - 2 ** (bits - 1)) * s
    else:
        out = q * s + _expand(zero.astype(jnp.float32), group_size, axis)
    return out.astype(dtype)


def pack(codes: jnp.ndarray, bits: int, axis: int = -1) -> jnp.ndarray:
    """Packs uint8 codes (< 2^bits) 8 // bits per byte, least significant bits first, along `axis`."""
    _check(bits, "token")
    if bits == 8:
        return codes.astype(jnp.uint8)
    per = 8 // bits
    axis = axis % codes.ndim
    n = codes.shape[axis]
    if n % per:
        raise ValueError(f"axis length {n} is not a multiple of {per} codes per byte ({bits} bits)")
    c = jnp.moveaxis(codes.astype(jnp.uint32), axis, -1)
    c = c.reshape(*c.shape[:-1], n // per, per)
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    packed = jnp.sum(c << shifts, axis=-1).astype(jnp.uint8)
    return jnp.moveaxis(packed, -1, axis)


def unpack(packed: jnp.ndarray, bits: int, axis: int = -1) -> jnp.ndarray:
    """Inverse of `pack`: uint8 `[..., n * bits / 8, ...]` -> uint8 codes `[..., n, ...]` along `axis`."""
    _check(bits, "token")
    if bits == 8:
        return packed.astype(jnp.uint8)
    per = 8 // bits
    axis = axis % packed.ndim
    p = jnp.moveaxis(packed.astype(jnp.uint32), axis, -1)
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    codes = (p[..., None] >> shifts) & (2**bits - 1)
    codes = codes.reshape(*p.shape[:-1], p.shape[-1] * per).astype(jnp.uint8)
    return jnp.moveaxis(codes, -1, axis)


def packed_axis(axis: Axis) -> int:
    """Array axis (of a `[..., T, D]` tensor) along which codes are packed: the grouped axis."""
    return -1 if axis == "token" else -2


def fake_quantize(
    x: jnp.ndarray,
    bits: int,
    group_size: int,
    axis: Axis = "token",
    symmetric: bool = False,
    scale_dtype=jnp.float16,
) -> jnp.ndarray:
    """quantize -> dequantize, returned in x's dtype. bits == 16 returns x rounded to bf16 (the unquantized store)."""
    if bits == 16:
        return x.astype(jnp.bfloat16).astype(x.dtype)
    codes, scale, zero = quantize(x, bits, group_size, axis, symmetric, scale_dtype)
    return dequantize(codes, scale, zero, bits, group_size, axis, dtype=jnp.float32).astype(x.dtype)


def scale_dtype_of(name: str):
    """Manifest name -> jnp dtype for scales/zeros."""
    table = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}
    if name not in table:
        raise ValueError(f"scale_dtype {name!r} is not one of {sorted(table)}")
    return table[name]


def bytes_per_element_of(name: str) -> int:
    return int(np.dtype(scale_dtype_of(name)).itemsize)
