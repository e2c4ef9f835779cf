"""Tile math of dequant-fused paged attention: the online-softmax step both kernels run (the TPU kernel in
`[rows, tokens]` orientation), and the GPU (Triton) kernel's operand scheme. The TPU (Mosaic) kernel dequantizes
with `tile_quant`, shared with the write kernels and the reference.

Plain functions of jnp arrays (blocks already loaded from refs); nothing here touches a ref or a backend primitive,
so a kernel body calls them on its tiles and the pure-jnp side of a wrapper calls them on whole arrays.

Conventions (the GPU kernel's; a TPU kernel may use the same or transpose freely):
- Scores are kept *transposed*, `s_t [tokens, rows]`: the KV tile is the matmul's left operand (its M dimension is
  the many tokens of a page block), the few query rows (GQA heads x query tokens, padded to >= 16) are N.
- Softmax runs in base 2: scores are multiplied by `sm_scale * log2(e)` and `exp2` is used; the running max `m` and
  the per-split results are in that base. `combine_splits` converts the final log-sum-exp back to base e.
- Packed codes (DESIGN.md "Packing", least significant bits first): byte `i` of a token-axis row holds channels
  `per * i + j` for `j < per = 8 // bits`, in bits `[j * bits, (j + 1) * bits)`. Instead of interleaving the unpacked
  nibbles back into channel order, the query is permuted once per call (`arrange_q_token`) so that "nibble j of byte
  column i" meets "query channel per * i + j" in the dot. Scale and zero are folded into the score side:
  `q . (c * s + z) = s * (q . c) + z * sum(q)` for a group of channels sharing one (s, z).
- Tensor-core operands are bf16. Codes (integers < 256) are exact in bf16; float32 query / probability tiles are
  split into `parts` bf16 terms (`split_parts`), so 2 parts carry ~16 significant bits and 3 parts ~24. Codes can
  instead be f16 operands `1024 + field` (`f16=True`; an 8-bit code is then one whole-byte field), against f16
  parts (`round_f16`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def codes_per_byte(bits: int) -> int:
    """Codes packed into one byte (1 for 8 bits); 16-bit stores are not packed."""
    return 8 // bits


def unpack_field(words: jnp.ndarray, bits: int, j: int) -> jnp.ndarray:
    """Field j (bits [j*bits, (j+1)*bits)) of integer `words` (any signed int dtype holding bytes), as int32."""
    w = words.astype(jnp.int32)
    if bits == 8:
        return w & 0xFF
    return (w >> (j * bits)) & ((1 << bits) - 1)


def unpack_field_rows(words: jnp.ndarray, bits: int, shift_codes: jnp.ndarray) -> jnp.ndarray:
    """Like `unpack_field`, with a per-row field index `shift_codes` [rows] (channel-axis pages read in token order)."""
    w = words.astype(jnp.int32)
    if bits == 8:
        return w & 0xFF
    return (w >> (shift_codes[:, None] * bits)) & ((1 << bits) - 1)


def codes_to_operand(c: jnp.ndarray) -> jnp.ndarray:
    """Integer codes (< 256) -> bf16 matmul operand (exact). Uses int->float conversions (slow on GPUs)."""
    return c.astype(jnp.float32).astype(jnp.bfloat16)


# Magic-number conversion: a field f < 128 OR-ed into the mantissa of bf16 128.0 (bits 0x4300) *is* the bf16 number
# 128 + f, exactly, with no int->float instruction. Kernels feed these "offset codes" to the dot and subtract the
# offset on the score / output side (`magic_offset`), where it costs one multiply-add per token, not per element.
MAGIC_BITS = 0x4300
MAGIC = 128.0
# An 8-bit code does not fit bf16's 7 mantissa bits, so by default it is read as two 4-bit fields (two dots). With
# `f16=True` it is one field: a byte OR-ed into f16 1024.0 (bits 0x6400, 10 mantissa bits) is the f16 number
# 1024 + byte, exactly, and the other operand of its dots (query or probabilities) is an f16 tile too. 2/4-bit fields
# become f16 operands the same way where a kernel computes in f16 (small value groups dequantized in f16).
MAGIC16_BITS = 0x6400
MAGIC16 = 1024.0


def field_bits(bits: int, f16: bool = False) -> int:
    """Width of one unpacked field: the code itself for 2/4 bits (and 8 bits with `f16`); otherwise 8-bit codes are
    read as two 4-bit nibbles."""
    return 4 if bits == 8 and not f16 else bits


def num_fields(bits: int, f16: bool = False) -> int:
    """Fields per byte of a token-axis row (see `field_bits`)."""
    return 8 // field_bits(bits, f16)


def field_weight(bits: int, j: int, f16: bool = False) -> float:
    """Weight of field j in its channel's code: 8-bit code = lo + 16 * hi as nibbles; other fields are whole codes."""
    return float(16**j) if bits == 8 and not f16 else 1.0


def field_channel(bits: int, byte_col, j: int):
    """Channel (within a token's head_dim) that field j of byte column `byte_col` belongs to."""
    return codes_per_byte(bits) * byte_col + (j if bits < 8 else 0)


def magic(f16: bool = False) -> float:
    """The offset a magic operand adds to its field: 128 (bf16) or 1024 (f16)."""
    return MAGIC16 if f16 else MAGIC


def magic_offset(bits: int, f16: bool = False) -> float:
    """Sum over fields of (weight * magic) for one channel: what the magic operand adds to each channel's code."""
    fields = range(num_fields(bits, f16))
    return magic(f16) * sum(field_weight(bits, j, f16) for j in fields if field_channel(bits, 0, j) == 0)


def magic_operand(words: jnp.ndarray, bits: int, j: int, f16: bool = False) -> jnp.ndarray:
    """Field j of bytes `words` (uint8 / int tile) as bf16 `128 + field`, or with `f16` as f16 `1024 + field` (8-bit
    codes then being one whole-byte field), exact, via bit operations only."""
    fb = field_bits(bits, f16)
    w = words.astype(jnp.int16)
    f = (w >> (j * fb)) & ((1 << fb) - 1) if j or fb < 8 else w & 0xFF
    if f16:
        return jax.lax.bitcast_convert_type(f | MAGIC16_BITS, jnp.float16)
    return jax.lax.bitcast_convert_type(f | MAGIC_BITS, jnp.bfloat16)


def magic_operand_rows(words: jnp.ndarray, bits: int, shift_codes: jnp.ndarray) -> jnp.ndarray:
    """Channel-axis rows read in token order (per-row field index `shift_codes` [rows]) as bf16 `128 + code`.

    Only for bits <= 4 (an 8-bit code does not fit the 7 mantissa bits); see `codes_to_operand` for 8 bits.
    """
    w = words.astype(jnp.int16)
    f = (w >> (shift_codes[:, None] * bits).astype(jnp.int16)) & ((1 << bits) - 1)
    return jax.lax.bitcast_convert_type(f | MAGIC_BITS, jnp.bfloat16)


def round_bf16(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 -> (bf16 round-to-nearest-even, the same value as float32), by integer ops on the bits.

    Written with bit operations on purpose: XLA on GPU may drop an f32 -> bf16 -> f32 round trip as "excess
    precision", which would silently zero the low part of a split (seen on H100: 3% error instead of 1e-5).
    Finite inputs only (queries, probabilities).
    """
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & jnp.uint32(0xFFFF0000)
    hi = jax.lax.bitcast_convert_type((b >> 16).astype(jnp.uint16), jnp.bfloat16)
    return hi, jax.lax.bitcast_convert_type(b, jnp.float32)


F16_MIN_NORMAL_BITS = 0x38800000  # float32 bits of 2^-14, f16's smallest normal number


def round_f16(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 -> (f16 round-to-nearest-even, the same value as float32), by integer ops on the bits, for the same
    reason as `round_bf16`. Results below f16's normal range (2^-14) are flushed to +-0, and |x| must stay below
    65520 (f16's largest finite value rounds from there): callers scale their tiles by powers of two to ~2^14 first,
    so a flushed element is < 2^-28 of the tile's largest.
    """
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = b & jnp.uint32(0x80000000)
    mag = b & jnp.uint32(0x7FFFFFFF)
    mag = (mag + 0xFFF + ((mag >> 13) & 1)) & jnp.uint32(0xFFFFE000)  # 23 -> 10 mantissa bits, ties to even
    keep = mag >= F16_MIN_NORMAL_BITS
    mag = jnp.where(keep, mag, jnp.uint32(0))
    h = jnp.where(keep, (mag >> 13) - jnp.uint32(112 << 10), jnp.uint32(0)) | (sign >> 16)  # exponent bias 127 -> 15
    hi = jax.lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.float16)
    return hi, jax.lax.bitcast_convert_type(sign | mag, jnp.float32)


def split_parts(x: jnp.ndarray, parts: int, rnd=round_bf16) -> tuple[jnp.ndarray, ...]:
    """float32 x -> `parts` bf16 terms whose float32 sum approximates x (hi first); exact for bf16 inputs at parts=1.

    `rnd`: the rounding, `round_bf16` or a kernel's equivalent returning the same (bf16, float32) pair, or
    `round_f16` (f16 terms: ~11 significant bits each)."""
    out = []
    r = x.astype(jnp.float32)
    for i in range(parts):
        hi, hi_f32 = rnd(r)
        out.append(hi)
        if i + 1 < parts:
            r = r - hi_f32
    return tuple(out)


def parts_value(parts: tuple[jnp.ndarray, ...]) -> jnp.ndarray:
    """float32 value the dot actually sees for split operands (sum of the bf16 parts).

    The magic offset must be removed with sums of *this* value, not of the exact float32 operand: then the offset
    cancels up to float32 rounding instead of amplifying the parts' rounding error by offset / code (~17x).
    """
    v = parts[0].astype(jnp.float32)
    for x in parts[1:]:
        v = v + x.astype(jnp.float32)
    return v


def zero_term(scale: jnp.ndarray, zero: jnp.ndarray | None, bits: int) -> jnp.ndarray:
    """Additive constant of x = c * scale + z_eff: the stored zero (asymmetric) or -2^(b-1) * scale (symmetric)."""
    s = scale.astype(jnp.float32)
    if zero is None:
        return -float(2 ** (bits - 1)) * s
    return zero.astype(jnp.float32)


def col_block(head_dim: int, bits: int, group_size: int, minimum: int = 16) -> int:
    """Byte columns per token-axis column block: one group's bytes, but at least `minimum` (16: the tensor-core
    minimum K/M) and at most a whole row."""
    per = codes_per_byte(bits)
    return min(head_dim // per, max(group_size // per, minimum))


def arrange_q_token(q_t: jnp.ndarray, bits: int, group_size: int, f16: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Query, transposed `q_t [..., D, R]` -> per-(group, field) blocks for token-axis packed keys.

    Returns `(qk [..., ngroups, F, cb, R], qsum [..., ngroups, R])` with F = `num_fields(bits, f16)`: `qk[g, j, i, r]
    = field_weight(j) * q[r, d]` where `d = field_channel(bits, cbi * cb + i, j)` and `cbi = g // groups_per_block`,
    when channel d belongs to group g, else 0; `qsum[g]` = sum of q over group g. A column block holds
    `cb = col_block(...)` bytes; when one group's bytes are fewer than 16 the block spans several groups and the
    zeros select one group per dot.
    """
    *lead, d, r = q_t.shape
    per = codes_per_byte(bits)
    nf = num_fields(bits, f16)
    cb = col_block(d, bits, group_size)
    ng = d // group_size
    gpb = cb * per // group_size  # groups per column block
    x = q_t.reshape(*lead, d // (cb * per), cb, per, r)  # [.., ncb, cb, per, R]
    blocks = []
    for g in range(ng):
        cbi = g // gpb
        fields = []
        for j in range(nf):
            xb = x[..., cbi, :, j if bits < 8 else 0, :] * field_weight(bits, j, f16)  # [.., cb, R]
            keep = (field_channel(bits, cbi * cb + jnp.arange(cb), j) // group_size) == g  # [cb]
            fields.append(jnp.where(keep[:, None], xb, 0.0))
        blocks.append(jnp.stack(fields, axis=-3))  # [.., F, cb, R]
    qk = jnp.stack(blocks, axis=-4)  # [.., ng, F, cb, R]
    qsum = q_t.reshape(*lead, ng, group_size, r).sum(axis=-2)
    return qk, qsum


def interleave_fields(fields) -> jnp.ndarray:
    """Tiles `[.., n]` (1, 2 or 4 of them) -> one `[.., n * F]` whose element `i * F + j` is `fields[j][.., i]`.
    Written as nested two-way stacks on the last axis (`tt.join` in the Triton lowering, which keeps the new axis in
    each thread's registers): one axis of 2 for two fields, axes (j // 2, j % 2) for four."""
    nf = len(fields)
    if nf == 1:
        return fields[0]
    if nf not in (2, 4):
        raise ValueError(f"interleave_fields: {nf} fields, expected 1, 2 or 4")
    lead, n = fields[0].shape[:-1], fields[0].shape[-1]
    xs = list(fields)
    if nf == 4:
        xs = [jnp.stack([xs[j0], xs[2 + j0]], axis=-1) for j0 in range(2)]
    return jnp.stack(xs, axis=-1).reshape(*lead, n * nf)


def bytes_of_words(w: jnp.ndarray) -> jnp.ndarray:
    """uint32 words `[.., n]` -> their bytes `[.., 4 * n]` uint8, least significant first (the byte order of the
    pool the words were read from)."""
    return interleave_fields([(w >> (8 * k)).astype(jnp.uint8) for k in range(4)])


def group_mask_of_block(cb: int, cbi: int, bits: int, group_size: int, j: int, g: int) -> jnp.ndarray:
    """bool [cb]: which byte columns of column block cbi hold, in field j, a channel of group g (output masks)."""
    return (field_channel(bits, cbi * cb + jnp.arange(cb), j) // group_size) == g


def unarrange_out_token(o_t: jnp.ndarray, bits: int, group_size: int, head_dim: int, f16: bool = False) -> jnp.ndarray:
    """Per-field outputs `o_t [..., ncb, F, cb, R]` -> `[..., R, D]` in channel order (8-bit nibbles: lo + 16 * hi)."""
    del group_size
    if bits == 8 and not f16:
        o_t = o_t[..., :, :1, :, :] + field_weight(8, 1) * o_t[..., :, 1:, :, :]
    *lead, ncb, per, cb, r = o_t.shape
    x = jnp.moveaxis(o_t, -1, -4)  # [.., R, ncb, per, cb]
    x = jnp.swapaxes(x, -1, -2)  # [.., R, ncb, cb, per]
    return x.reshape(*lead, r, head_dim)


def fold_scores(dots: jnp.ndarray, scale: jnp.ndarray, zterm: jnp.ndarray, qsum: jnp.ndarray) -> jnp.ndarray:
    """Scores of one channel group from code dots: `dots [T, R] * scale [T] + zterm [T] * qsum [R]`."""
    return dots * scale[:, None] + zterm[:, None] * qsum[None, :]


def running_max(m: jnp.ndarray, s_tiles, axis: int, tile_max=None):
    """(running max after these tiles, the same with -inf, i.e. nothing seen yet, as 0): m has the tiles' shape without
    the token axis `axis`, or with it kept as 1. `tile_max(s, axis, keepdims)`: a kernel's own maximum (default
    `jnp.max`)."""
    keep = m.ndim == s_tiles[0].ndim
    tile_max = tile_max or (lambda s, axis, keepdims: jnp.max(s, axis=axis, keepdims=keepdims))
    m_new = m
    for s in s_tiles:
        m_new = jnp.maximum(m_new, tile_max(s, axis, keep))
    return m_new, jnp.where(m_new == -jnp.inf, 0.0, m_new)


def _shift(s: jnp.ndarray, m_safe: jnp.ndarray, axis: int) -> jnp.ndarray:
    """s - m_safe, broadcast along the token axis."""
    return s - (m_safe if m_safe.ndim == s.ndim else jnp.expand_dims(m_safe, axis))


def online_softmax_step(m: jnp.ndarray, l: jnp.ndarray, s: jnp.ndarray, *, axis: int = 0, exp2=jnp.exp2):
    """One block of base-2 scores `s` (masked entries -inf) against the running max `m` and sum `l`. Tokens run along
    `axis`: `s [T, R]` with `m, l [R]` (the GPU kernel's transposed tiles), or `s [R, T]` with `m, l [R, 1]` (the TPU
    kernel's, whose 2-D state Mosaic lays out well); `exp2`: a kernel's own 2^x, if it has one.

    Returns `(m_new, alpha, p, l_new)`; accumulators are multiplied by `alpha` before adding `p`-weighted values. A
    block with no valid token leaves the state unchanged (alpha = 1, p = 0).
    """
    m_new, m_safe = running_max(m, [s], axis)
    alpha = exp2(m - m_safe)
    p = exp2(_shift(s, m_safe, axis))
    l_new = l * alpha + jnp.sum(p, axis=axis, keepdims=m.ndim == s.ndim)
    return m_new, alpha, p, l_new


def online_softmax_step_deferred(m: jnp.ndarray, l_acc: jnp.ndarray, s_tiles, exp2=jnp.exp2):
    """`online_softmax_step` over a block's score tiles `s_tiles` (a list of [T, R], e.g. token sub-blocks) with the
    sum over tokens deferred: `l_acc [T, R]` accumulates their p elementwise. Returns (m, alpha, [p per tile], l_acc).

    Sums over the token axis cost a cross-warp reduction (shared memory and barriers) per block on a GPU when tokens
    are spread over warps; rescaling by alpha commutes with the sum, so the kernel sums `l_acc` once at the end.
    """
    m_new, m_safe = running_max(m, s_tiles, 0)
    alpha = exp2(m - m_safe)
    ps, l_acc = fixed_softmax_step(m_safe, l_acc * alpha[None, :], s_tiles, exp2)  # the step against the new max
    return m_new, alpha, ps, l_acc


def fixed_reference(s_tiles) -> jnp.ndarray:
    """A fixed softmax reference [R] from the score tiles (a list of [T, R]) of a split's first block: their maximum
    over tokens, 0 where a column saw no finite score (so that masked -inf scores still give p = 0, never NaN)."""
    ref = functools.reduce(jnp.maximum, [jnp.max(s, axis=0) for s in s_tiles])
    return jnp.where(jnp.isfinite(ref), ref, 0.0)


# a fixed-reference split whose sum of p reaches this counts as overflowed and is redone with the running softmax (a
# score ~64 above the reference; the combine's sums over splits stay far from float32's limit): both GPU kernels
FIXED_L_LIMIT = 2.0**64


def fixed_softmax_step(ref: jnp.ndarray, l_acc: jnp.ndarray, s_tiles, exp2=jnp.exp2):
    """`online_softmax_step_deferred` against a fixed reference `ref [R]` instead of the running maximum: no maximum
    over the block's tokens and no rescaling (alpha = 1). Returns ([p per tile], l_acc).

    Exact as long as nothing overflows: a later score more than ~127 above `ref` makes p (or, with large values, the
    p-weighted sums) inf, which the caller must detect on its results (the GPU kernels also treat sums of p from
    FIXED_L_LIMIT up as overflow) and then redo the split with the running softmax. Scores below `ref` lose nothing the
    running form keeps (`ref` is at most the true maximum, so p of the largest score is >= 1 and p < 2^-126, flushed
    to 0, is below float32 resolution of the sum)."""
    ps = [exp2(_shift(s, ref, 0)) for s in s_tiles]
    for p in ps:
        l_acc = l_acc + p
    return ps, l_acc


def combine_splits(o: jnp.ndarray, m: jnp.ndarray, l: jnp.ndarray, split_by_split: bool = False):
    """Exact flash-decoding combine of unnormalized partial results over splits S.

    o: [..., S, R, D] partial outputs (sum of p * v); m, l: [..., S, R] base-2 running max and sum of p.
    Returns (out [..., R, D] normalized, lse [..., R] in base e); out = 0 and lse = -inf where no split saw a token.
    `split_by_split`: written out one split at a time, with no reduction over S: element-wise, so that XLA may fuse
    it into one or two launches, where a reduction over S feeding another (the maximum, then the sums) takes a launch
    each, a few microseconds apiece on a decode step's path (for a few splits; the Mosaic GPU wrapper's, up to 16).
    """
    if split_by_split:
        parts = range(o.shape[-3])
        mx = functools.reduce(jnp.maximum, [m[..., s, :] for s in parts])
        mx_safe = jnp.where(mx == -jnp.inf, 0.0, mx)
        w = [jnp.exp2(m[..., s, :] - mx_safe) for s in parts]  # 0 for splits that saw nothing
        lsum = functools.reduce(jnp.add, [w[s] * l[..., s, :] for s in parts])
        osum = functools.reduce(jnp.add, [o[..., s, :, :] * w[s][..., None] for s in parts])
    else:
        mx = jnp.max(m, axis=-2, keepdims=True)
        ref = jnp.where(mx == -jnp.inf, 0.0, mx)  # [.., 1, R]
        w = jnp.exp2(m - ref)  # [.., S, R]; 0 for splits that saw nothing
        lsum = jnp.sum(w * l, axis=-2)  # [.., R]
        osum = jnp.sum(o * w[..., None], axis=-3)  # [.., R, D]
        mx_safe = ref[..., 0, :]
    ok = lsum > 0
    denom = jnp.where(ok, lsum, 1.0)
    out = jnp.where(ok[..., None], osum / denom[..., None], 0.0)
    lse = jnp.where(ok, (mx_safe + jnp.log2(denom)) * LN2, -jnp.inf)
    return out, lse
