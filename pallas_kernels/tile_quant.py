"""In-kernel quantize + pack of one page tile: the tile math the GPU (Triton) and TPU (Mosaic) write kernels share.

Plain functions of arrays (no refs), so they run inside any Pallas kernel and, unchanged, outside one (tests).
They reproduce `kvtuner_jax.quant.quantize` + `quant.pack` bit for bit: the same float32 operations in the same
order (range, `* 1/qmax`, rounding of scale/zero to the scale dtype first, `x - zero`, `quant.round_div`, clip). No
result depends on how a backend divides (round_div decides ties with an exact product), so a kernel built from them
is bit-exact against `quantize_write_reference` on every backend, compiled or interpreted.

Two ways to do the work that moves data across lanes (grouping along head_dim, packing codes into bytes):
- `reshape=True` (Triton): split the grouped axis with reshapes and reduce; every shape stays a power of two.
- `reshape=False` (Mosaic TPU, which cannot split the lane axis in a reshape): per-group masked reductions over the
  whole tile, and packing / unpacking / group expansion as a matmul against a 0/1/2^k selection matrix built from
  iotas (`select_dot`). Each is exact as single-pass bf16 MXU work with a float32 accumulator: codes are integers
  < 256 and the weights powers of two (exact in bf16), every packed output is an integer <= 255, every expanded
  output is one stored scale or zero, and a float16 one is the exact sum of two bf16 pieces. (Full-precision float32
  matmuls would take ~6 bf16 passes for the same exact result.) The attention kernel's token-axis pages skip the
  unpacking matmul altogether (`dequantize_fields`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kvtuner_jax.quant import EPS, inv_levels, round_div
from pallas_kernels.tile_attention import unpack_field


def _reduce_axis(axis: str) -> int:
    """Tile axis a group runs along: channels (lanes) for "token" groups, tokens (rows) for "channel" groups."""
    return 1 if axis == "token" else 0


def group_stats(x: jnp.ndarray, group_size: int, axis: str, *, symmetric: bool, reshape: bool):
    """Per-group statistics of a tile x [P, D] f32.

    Returns `(compact, full)`: tuples of (min, max) (asymmetric) or (absmax,) (symmetric); `compact` in the group
    shape ([P, D/G] for "token", [P/G, D] for "channel"), `full` broadcast back to [P, D].
    """
    p, d = x.shape
    ra = _reduce_axis(axis)
    fns = (jnp.max,) if symmetric else (jnp.min, jnp.max)
    src = jnp.abs(x) if symmetric else x
    if reshape:
        if axis == "token":
            g = src.reshape(p, d // group_size, group_size)
            compact = tuple(fn(g, axis=2) for fn in fns)  # [P, D/G]
            full = tuple(jnp.broadcast_to(c[:, :, None], g.shape).reshape(p, d) for c in compact)
        else:
            g = src.reshape(p // group_size, group_size, d)
            compact = tuple(fn(g, axis=1) for fn in fns)  # [P/G, D]
            full = tuple(jnp.broadcast_to(c[:, None, :], g.shape).reshape(p, d) for c in compact)
        return compact, full
    n = (d if axis == "token" else p) // group_size
    cshape = (p, n) if axis == "token" else (n, d)
    if n == 1:
        compact = tuple(fn(src, axis=ra, keepdims=True) for fn in fns)  # [P, 1] or [1, D]
        return compact, tuple(jnp.broadcast_to(c, (p, d)) for c in compact)
    gid = lax.broadcasted_iota(jnp.int32, (p, d), ra) // group_size
    cid = lax.broadcasted_iota(jnp.int32, cshape, ra)
    inits = (jnp.inf, -jnp.inf) if not symmetric else (-jnp.inf,)
    compact = [jnp.zeros(cshape, jnp.float32) for _ in fns]
    full = [jnp.zeros((p, d), jnp.float32) for _ in fns]
    for g in range(n):  # static; n = D/G or P/G is small for any sensible group size
        in_g = gid == g
        for i, (fn, init) in enumerate(zip(fns, inits, strict=True)):
            r = fn(jnp.where(in_g, src, init), axis=ra, keepdims=True)  # [P, 1] or [1, D]
            full[i] = jnp.where(in_g, r, full[i])
            compact[i] = jnp.where(cid == g, r, compact[i])
    return tuple(compact), tuple(full)


def scale_zero(stats, bits: int, symmetric: bool, scale_dtype):
    """Group statistics -> (scale, zero) rounded to `scale_dtype` (zero None when symmetric). Elementwise.

    Same float32 expressions as `kvtuner_jax.quant.quantize`.
    """
    fmax = float(jnp.finfo(scale_dtype).max)  # a group too wide for the scale dtype saturates, as in the reference
    inv = jnp.float32(inv_levels(bits, symmetric))
    if symmetric:
        (amax,) = stats
        scale = jnp.minimum(jnp.maximum(amax, EPS) * inv, fmax)
        return scale.astype(scale_dtype), None
    mn, mx = stats
    scale = jnp.minimum(jnp.maximum(mx - mn, EPS) * inv, fmax)
    return scale.astype(scale_dtype), jnp.clip(mn, -fmax, fmax).astype(scale_dtype)


def codes_of(x, scale_full, zero_full, bits: int, symmetric: bool) -> jnp.ndarray:
    """x [P, D] f32 and scale/zero broadcast to [P, D] (scale dtype) -> unpacked codes [P, D] int32 in [0, 2^b)."""
    qmax = 2**bits - 1
    s = scale_full.astype(jnp.float32)
    if symmetric:
        q = round_div(x, s) + 2 ** (bits - 1)
    else:
        q = round_div(x - zero_full.astype(jnp.float32), s)
    return jnp.clip(q, 0.0, float(qmax)).astype(jnp.int32)


def bf16_pieces(x: jnp.ndarray) -> list[jnp.ndarray]:
    """x -> bf16 arrays whose float32 sum is exactly x: x itself for bf16 and integer types (callers pass integers
    < 256, exact in bf16), two pieces for float16 (11 significant bits: an 8-bit head and the rest, which fits bf16;
    f16's subnormals are normal numbers in bf16). Finite values; callers mask stale pages' non-finite ones."""
    if x.dtype == jnp.bfloat16:
        return [x]
    if jnp.issubdtype(x.dtype, jnp.integer):
        return [x.astype(jnp.float32).astype(jnp.bfloat16)]
    if x.dtype != jnp.float16:
        raise TypeError(f"bf16_pieces: expected bfloat16, float16 or integer codes, got {x.dtype}")
    xf = x.astype(jnp.float32)  # (Mosaic has no direct float16 -> bfloat16 cast)
    head = xf.astype(jnp.bfloat16)
    return [head, (xf - head.astype(jnp.float32)).astype(jnp.bfloat16)]


def select_dot(a: jnp.ndarray, b: jnp.ndarray, x_is_a: bool = True) -> jnp.ndarray:
    """a @ b -> f32, exactly, where one side (x: `a` if x_is_a) holds stored values (`bf16_pieces`) and the other a
    selection matrix of 0s and powers of two <= 2^7 whose products with x sum exactly in float32 (one term per output,
    or small integers). Single-pass bf16 dots, one per piece of x."""
    x, w = (a, b) if x_is_a else (b, a)
    w = w.astype(jnp.bfloat16)  # exact: 0 or a power of two
    out = None
    for piece in bf16_pieces(x):
        d = (
            jnp.dot(piece, w, preferred_element_type=jnp.float32)
            if x_is_a
            else jnp.dot(w, piece, preferred_element_type=jnp.float32)
        )
        out = d if out is None else out + d  # exact: the pieces of one stored value, or integers <= 255
    return out


def pack_matrix(n: int, bits: int, transpose: bool = False) -> jnp.ndarray:
    """[n, n*b/8] f32 with W[k, j] = 2^(b*(k % per)) where k // per == j, else 0: `codes @ W` packs codes LSB first.

    transpose=True gives W.T [n*b/8, n] (pack along rows: `W.T @ codes`).
    """
    per = 8 // bits
    shape = (n * bits // 8, n) if transpose else (n, n * bits // 8)
    k = lax.broadcasted_iota(jnp.int32, shape, 1 if transpose else 0)
    j = lax.broadcasted_iota(jnp.int32, shape, 0 if transpose else 1)
    w = jnp.left_shift(jnp.int32(1), (k % per) * bits)
    return jnp.where(k // per == j, w, 0).astype(jnp.float32)


def pack_tile(codes: jnp.ndarray, bits: int, axis: str, *, reshape: bool) -> jnp.ndarray:
    """Unpacked codes [P, D] int32 -> packed uint8 ([P, D*b/8] for "token", [P*b/8, D] for "channel"), LSB first."""
    if bits == 8:
        return codes.astype(jnp.uint8)
    per = 8 // bits
    p, d = codes.shape
    if reshape:
        if axis == "token":
            c = codes.reshape(p, d // per, per)
            sh = lax.broadcasted_iota(jnp.int32, (1, 1, per), 2) * bits
            return jnp.sum(jnp.left_shift(c, sh), axis=2).astype(jnp.uint8)
        c = codes.reshape(p // per, per, d)
        sh = lax.broadcasted_iota(jnp.int32, (1, per, 1), 1) * bits
        return jnp.sum(jnp.left_shift(c, sh), axis=1).astype(jnp.uint8)
    if axis == "token":
        packed = select_dot(codes, pack_matrix(d, bits))
    else:
        packed = select_dot(pack_matrix(p, bits, transpose=True), codes, x_is_a=False)
    return packed.astype(jnp.int32).astype(jnp.uint8)


def quantize_tile(
    x: jnp.ndarray,
    *,
    bits: int,
    group_size: int,
    axis: str,
    symmetric: bool,
    scale_dtype,
    reshape: bool,
):
    """One page of one KV head, x [P, D] (any float) -> (packed codes uint8, scale, zero | None) in the pool layout.

    codes: [P, D*b/8] ("token") or [P*b/8, D] ("channel"); scale/zero: [P, D/G] or [P/G, D] in `scale_dtype`.
    """
    xf = x.astype(jnp.float32)
    xf = jnp.where(jnp.isfinite(xf), xf, 0.0)  # non-finite values quantize as 0 (quant.py contract)
    compact, full = group_stats(xf, group_size, axis, symmetric=symmetric, reshape=reshape)
    scale_c, zero_c = scale_zero(compact, bits, symmetric, scale_dtype)
    scale_f, zero_f = scale_zero(full, bits, symmetric, scale_dtype)
    codes = codes_of(xf, scale_f, zero_f, bits, symmetric)
    return pack_tile(codes, bits, axis, reshape=reshape), scale_c, zero_c


def unpack_tile(packed: jnp.ndarray, bits: int, axis: str, *, reshape: bool) -> jnp.ndarray:
    """Inverse of `pack_tile`: packed uint8 -> unpacked codes [P, D] int32."""
    c = packed.astype(jnp.int32)
    if bits == 8:
        return c
    per = 8 // bits
    mask = 2**bits - 1
    r, cols = c.shape
    if reshape:
        if axis == "token":
            sh = lax.broadcasted_iota(jnp.int32, (1, 1, per), 2) * bits
            return jnp.right_shift(c[:, :, None], sh).__and__(mask).reshape(r, cols * per)
        sh = lax.broadcasted_iota(jnp.int32, (1, per, 1), 1) * bits
        return jnp.right_shift(c[:, None, :], sh).__and__(mask).reshape(r * per, cols)
    # Spread each byte over its `per` code positions with a 0/1 matmul (exact: bytes < 256), then shift and mask
    # per position. Shifts stay on int32 (Mosaic has no narrow shifts).
    if axis == "token":
        spread = _onehot((cols, cols * per), per, 1)  # [D*b/8, D]: byte j feeds columns j*per .. j*per+per-1
        wide = select_dot(c, spread)  # [P, D]
        pos = lax.broadcasted_iota(jnp.int32, wide.shape, 1) % per
    else:
        spread = _onehot((r * per, r), per, 0)  # [P, P*b/8]
        wide = select_dot(spread, c, x_is_a=False)  # [P, D]
        pos = lax.broadcasted_iota(jnp.int32, wide.shape, 0) % per
    return jnp.right_shift(wide.astype(jnp.int32), pos * bits) & mask


def expand_groups(s: jnp.ndarray, group_size: int, axis: str, shape, *, reshape: bool) -> jnp.ndarray:
    """Group-shaped scale/zero ([P, D/G] or [P/G, D]) -> [P, D] f32, each value repeated over its group."""
    p, d = shape
    sf = s.astype(jnp.float32)
    if group_size == 1:
        return sf
    if reshape:
        if axis == "token":
            return jnp.broadcast_to(sf[:, :, None], (p, d // group_size, group_size)).reshape(p, d)
        return jnp.broadcast_to(sf[:, None, :], (p // group_size, group_size, d)).reshape(p, d)
    n = (d if axis == "token" else p) // group_size
    if n == 1:
        return jnp.broadcast_to(sf, (p, d))
    # 0/1 matmul: each output is exactly one stored value.
    if axis == "token":
        return select_dot(s, _onehot((n, d), group_size, 1))
    return select_dot(_onehot((p, n), group_size, 0), s, x_is_a=False)


def _onehot(shape, repeat: int, wide_dim: int) -> jnp.ndarray:
    """0/1 f32 matrix with M[i, j] = 1 where (index along `wide_dim`) // repeat == (index along the other dim)."""
    wide = lax.broadcasted_iota(jnp.int32, shape, wide_dim)
    narrow = lax.broadcasted_iota(jnp.int32, shape, 1 - wide_dim)
    return (wide // repeat == narrow).astype(jnp.float32)


def dequantize_tile(codes, scale, zero, *, bits, group_size, axis, symmetric, reshape: bool) -> jnp.ndarray:
    """Packed page tile (pool layout) -> values [P, D] f32; same expressions as `kvtuner_jax.quant.dequantize`."""
    c = unpack_tile(codes, bits, axis, reshape=reshape)
    q = c.astype(jnp.float32)
    s = expand_groups(scale, group_size, axis, q.shape, reshape=reshape)
    if symmetric:
        return (q - 2 ** (bits - 1)) * s
    return q * s + expand_groups(zero, group_size, axis, q.shape, reshape=reshape)


def num_fields(bits: int, axis: str) -> int:
    """Fields a packed row splits into without moving data across lanes: codes per byte of a token-axis store (each
    field j holds the channels per*i + j of byte columns i), 1 otherwise (8/16 bits, or channel-axis rows)."""
    return 8 // bits if axis == "token" and bits < 8 else 1


def field_groups(s: jnp.ndarray, group_size: int, per: int, j: int, cols: int) -> jnp.ndarray:
    """Per-token group values s [P, D/G] (stored dtype) -> [P, cols] f32 for field j: column i takes the value of the
    group of channel per*i + j, by a 0/1 `select_dot` as in `expand_groups`."""
    n = s.shape[1]
    if n == 1:
        return jnp.broadcast_to(s.astype(jnp.float32), (s.shape[0], cols))
    g = lax.broadcasted_iota(jnp.int32, (n, cols), 0)
    i = lax.broadcasted_iota(jnp.int32, (n, cols), 1)
    return select_dot(s, ((per * i + j) // group_size == g).astype(jnp.float32))


def dequantize_fields(codes, scale, zero, *, bits, group_size, symmetric) -> list[jnp.ndarray]:
    """Token-axis packed page tile [P, D*b/8] -> per field j the values of channels per*i + j, [P, D*b/8] f32 each.

    Bit for bit `dequantize_tile`'s columns j::per (the same float32 expressions), but each field is a shift and a
    mask of the bytes where they lie, so nothing moves across lanes: no spread matmul over the whole tile, only the
    small per-field group matmul of `field_groups`. Consumers pair field j with query channels j::per (scores) and
    write output channels j::per (values), which is plain reassociation of the same dot products.
    """
    per = 8 // bits
    cols = codes.shape[1]
    out, groups = [], {}
    for j in range(per):
        q = unpack_field(codes, bits, j).astype(jnp.float32)
        # Byte column i's group is the same for every field when whole bytes lie in one group: expand once.
        key = 0 if group_size % per == 0 else j
        if key not in groups:
            groups[key] = tuple(None if x is None else field_groups(x, group_size, per, j, cols) for x in (scale, zero))
        s, z = groups[key]
        out.append((q - 2 ** (bits - 1)) * s if symmetric else q * s + z)
    return out


def pool_outputs(out, scale, zero):
    """A write kernel's outputs (the pool arrays that exist, in `(codes, scale, zero)` order) -> the full triple,
    None where the pool has no such array (`scale`/`zero` are the inputs, to tell which exist)."""
    it = iter(out)
    codes = next(it)
    return codes, None if scale is None else next(it), None if zero is None else next(it)
