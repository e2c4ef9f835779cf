"""Tile math of dequant-fused paged attention, shared by the GPU (Triton) and TPU (Mosaic) kernels.

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
  split into `parts` bf16 terms (`split_parts`), so 2 parts carry ~16 significant bits and 3 parts ~24.
"""

from __future__ import annotations

import math

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
    """Integer codes (< 256) -> bf16 matmul operand (exact)."""
    return c.astype(jnp.float32).astype(jnp.bfloat16)


def split_parts(x: jnp.ndarray, parts: int) -> tuple[jnp.ndarray, ...]:
    """float32 x -> `parts` bf16 terms whose float32 sum approximates x (hi first); exact for bf16 inputs at parts=1."""
    out = []
    r = x.astype(jnp.float32)
    for i in range(parts):
        hi = r.astype(jnp.bfloat16)
        out.append(hi)
        if i + 1 < parts:
            r = r - hi.astype(jnp.float32)
    return tuple(out)


def zero_term(scale: jnp.ndarray, zero: jnp.ndarray | None, bits: int) -> jnp.ndarray:
    """Additive constant of x = c * scale + z_eff: the stored zero (asymmetric) or -2^(b-1) * scale (symmetric)."""
    s = scale.astype(jnp.float32)
    if zero is None:
        return -float(2 ** (bits - 1)) * s
    return zero.astype(jnp.float32)


def col_block(head_dim: int, bits: int, group_size: int) -> int:
    """Byte columns per token-axis column block: one group's bytes, but at least 16 (tensor-core minimum K/M)."""
    per = codes_per_byte(bits)
    return min(head_dim // per, max(group_size // per, 16))


def arrange_q_token(q_t: jnp.ndarray, bits: int, group_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Query, transposed `q_t [..., D, R]` -> per-(group, field) blocks for token-axis packed keys.

    Returns `(qk [..., ngroups, per, cb, R], qsum [..., ngroups, R])` where `qk[g, j, i, r] = q[r, d]` with
    `d = per * (cbi * cb + i) + j`, `cbi = g // groups_per_block`, when channel d belongs to group g, else 0, and
    `qsum[g] = sum of q over group g`. A column block holds `cb = col_block(...)` bytes; when one group's bytes are
    fewer than 16 the block spans several groups and the zeros select one group per dot.
    """
    *lead, d, r = q_t.shape
    per = codes_per_byte(bits)
    cb = col_block(d, bits, group_size)
    ng = d // group_size
    gpb = cb * per // group_size  # groups per column block
    x = q_t.reshape(*lead, d // (cb * per), cb, per, r)  # [.., ncb, cb, per, R]
    x = jnp.moveaxis(x, -2, -3)  # [.., ncb, per, cb, R]
    blocks = []
    for g in range(ng):
        cbi = g // gpb
        xb = x[..., cbi, :, :, :]  # [.., per, cb, R]
        chan = per * (cbi * cb + jnp.arange(cb))[None, :] + jnp.arange(per)[:, None]  # [per, cb]
        keep = (chan // group_size) == g
        blocks.append(jnp.where(keep[..., None], xb, 0.0))
    qk = jnp.stack(blocks, axis=-4)  # [.., ng, per, cb, R]
    qsum = q_t.reshape(*lead, ng, group_size, r).sum(axis=-2)
    return qk, qsum


def group_mask_of_block(cb: int, cbi: int, bits: int, group_size: int, j: int, g: int) -> jnp.ndarray:
    """bool [cb]: which byte columns of column block cbi hold, in field j, a channel of group g (output masks)."""
    per = codes_per_byte(bits)
    chan = per * (cbi * cb + jnp.arange(cb)) + j
    return (chan // group_size) == g


def unarrange_out_token(o_t: jnp.ndarray, bits: int, group_size: int, head_dim: int) -> jnp.ndarray:
    """Inverse of the field split for the output: `o_t [..., ncb, per, cb, R]` -> `[..., R, D]` in channel order."""
    *lead, ncb, per, cb, r = o_t.shape
    x = jnp.moveaxis(o_t, -1, -4)  # [.., R, ncb, per, cb]
    x = jnp.swapaxes(x, -1, -2)  # [.., R, ncb, cb, per]
    return x.reshape(*lead, r, head_dim)


def fold_scores(dots: jnp.ndarray, scale: jnp.ndarray, zterm: jnp.ndarray, qsum: jnp.ndarray) -> jnp.ndarray:
    """Scores of one channel group from code dots: `dots [T, R] * scale [T] + zterm [T] * qsum [R]`."""
    return dots * scale[:, None] + zterm[:, None] * qsum[None, :]


def online_softmax_step(m: jnp.ndarray, l: jnp.ndarray, s: jnp.ndarray):
    """One block of base-2 scores `s [T, R]` (masked entries -inf) against running `m, l [R]`.

    Returns `(m_new, alpha, p [T, R], l_new)`; accumulators are multiplied by `alpha` before adding `p`-weighted
    values. A block with no valid token leaves the state unchanged (alpha = 1, p = 0).
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=0))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[None, :])
    l_new = l * alpha + jnp.sum(p, axis=0)
    return m_new, alpha, p, l_new


def combine_splits(o: jnp.ndarray, m: jnp.ndarray, l: jnp.ndarray):
    """Exact flash-decoding combine of unnormalized partial results over splits S.

    o: [..., S, R, D] partial outputs (sum of p * v); m, l: [..., S, R] base-2 running max and sum of p.
    Returns (out [..., R, D] normalized, lse [..., R] in base e); out = 0 and lse = -inf where no split saw a token.
    """
    mx = jnp.max(m, axis=-2, keepdims=True)
    mx_safe = jnp.where(mx == -jnp.inf, 0.0, mx)
    w = jnp.exp2(m - mx_safe)  # [.., S, R]; 0 for splits that saw nothing
    lsum = jnp.sum(w * l, axis=-2)  # [.., R]
    osum = jnp.sum(o * w[..., None], axis=-3)  # [.., R, D]
    ok = lsum > 0
    denom = jnp.where(ok, lsum, 1.0)
    out = jnp.where(ok[..., None], osum / denom[..., None], 0.0)
    lse = jnp.where(ok, (mx_safe[..., 0, :] + jnp.log2(denom)) * LN2, -jnp.inf)
    return out, lse
