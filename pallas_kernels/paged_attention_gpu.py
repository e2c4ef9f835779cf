"""GPU kernel: paged attention over one layer's packed, quantized pages, dequantizing inside the kernel.

Pallas with the Triton lowering (`pallas_call` + `plgpu.CompilerParams`); runs compiled on NVIDIA GPUs and with
`interpret=True` on CPU (tests). Semantics are exactly `paged_attention.paged_attention_reference`.

Why the Triton lowering here, and where the Mosaic GPU kernel runs instead: JAX 0.11 marks the Triton lowering
deprecated, but it is the lowering that (a) runs the same kernel under `interpret=True` on CPU, which is how CI tests
it, (b) gives register-level integer ops (shift / mask of packed codes), gathers from a page table and `tl.dot` on
small, oddly shaped tiles (16 query rows) with no hand-written warpgroup choreography, and (c) runs on Ampere as well
as Hopper, and it covers every layout. On Hopper the Mosaic GPU
kernel for per-token decode (`paged_attention_mgpu`: TMA page copies, codes unpacked into warpgroup-MMA operands;
tested in Mosaic GPU's CPU interpreter) is now the faster one, and `paged_attention(kernel="auto")` hands it the
layers it reads (`mosaic_route`): it ran 1.6x slower at first (H100, 4/4 0.535 against 0.328 ms, 2026-12-05),
faster with an 8-bit side from 2026-12-06 (8/8 0.41-0.46 against 0.59-0.66 ms), and since its score tile has the
GQA group's width and V's operand goes straight to registers, 0.67-0.83x this kernel's time for 4/4, 2/2 and 4/2
at pages of 64 at the 21 shapes timed, batches 8-128 and contexts 1K-32K (4/4 at batch 32 x 16K 0.246 against
0.333 ms; 2026-12-06 night), and at 34 of 36 shapes at pages of 32. This kernel runs everything else: per-channel
(KIVI) keys, several groups per head, 16-bit sides, prefill chunks, fp8 pools, other GPUs, and 2- and 4-bit pairs at
pages of 16 or 128.
BENCHMARKS.md has the measured numbers behind the tuning defaults.

Design (the tile math is in `tile_attention`, whose online-softmax step the TPU kernel runs too):
- Grid (batch, kv_heads, splits). One program serves all query heads of one KV head (GQA group x query tokens,
  padded to R >= 16 rows), so every page is read once per KV head; splits over pages (flash-decoding) keep enough
  programs in flight when batch x kv_heads is small, and a tiny jnp combine merges them exactly.
- Tiles are transposed: the page block (TB = pages_per_block * P tokens) is the matmul's M side and the R query
  rows are N, so the dequantized codes are the left operand and the queries/probabilities the small right one.
- Token-axis packed codes are never interleaved back into channel order: field j of byte column i meets query
  channel per*i+j through a permuted query (`arrange_q_token`), and per-token scale/zero are folded into the
  scores (`s * (q.c) + z * sum q`) and into the probabilities (`(p * s) . c + sum(p * z)`), so the per-element
  work is shift, mask, int->bf16 and the tensor-core dot. Compiled, the unpacking is PTX inline assembly working on
  four bytes at once (`magic_fields`: prmt + shift + lop3, two bf16 operands per instruction), measured 1.15-1.3x
  faster per call than element-wise jnp ops on the H200 (BENCHMARKS.md); interpret mode runs the jnp form. The
  float32 -> bf16 rounding of operand parts and the softmax's exp2 are single PTX instructions too (`round_bf16_ptx`,
  `exp2_ptx`), where the Triton lowering emits an integer rounding emulation and a subnormal fix-up.
- Channel-axis (KIVI keys) stores pack several tokens of a channel into a byte. Stacked 2/4-bit keys are read in
  storage order, field j of the bytes being token sub-block j (every 2nd / 4th token of each page, unpacked like
  token-axis codes), with their values read at that row stride; otherwise they are read in token order (each byte
  row gathered once per field; 8-bit codes, one token a byte, as whole pages, converted int -> float: as two bf16
  nibble operands instead, kivi8/4 at bf16 took 0.643 -> 0.759 ms on the H200). Their per-channel scales are folded
  into the query, one copy of the query rows per token group of the block placed side by side in the padding of the
  R columns, so that one dot scores every group (keys, default; each column keeps its own group's tokens and runs
  its own softmax, and the split combine merges a row's columns; the block's scales are loaded as one [groups, D]
  tile and broadcast to the columns, except with 2-bit keys' four sub-blocks), or one group per dot
  (`channel_keys="fold"`), or applied by dequantizing the block in the kernel (`"dequant"`); channel-axis values have
  theirs applied to the output per token group. Per-token values with several groups per head are dequantized per field
  tile (default; column blocks of >= 32 bytes; the per-element scale tiles of a block's several groups come from
  [rows, groups] block loads broadcast along each group's bytes, or with `_variant="vselect"` from a select chain over
  the groups, bit for bit the same) or folded into p group by group (`small_value_groups="fold"`). At bf16 precision
  with f16-stored scales and zeros (default; `_variant="novhalf"` turns it off) the dequantization runs in f16
  arithmetic, `(1024 + code - 1024) * scale + zero` by `sub.f16x2` and `fma.rn.f16x2` (~1 instruction per element
  instead of ~2.5: bf16 -> f32, an f32 fma, f32 -> bf16), against p * 2^14 as an f16 operand: every dequantized
  value lies between f16-stored extremes, so nothing needs scaling, and f16 keeps 3 more bits than the bf16 it
  replaces. Measured on the H200 (2026-12-05): the 3.25-bit schedule's mean layer 0.585 -> 0.559 ms.
- Per-token values whose column blocks are narrower than 64 bytes (2-bit codes of a 128-channel head, small value
  groups: 32) give value dots of too few rows for a warpgroup MMA, so Triton emits warp-level MMAs for them. For
  small value groups dequantized the kernel joins 64 / bytes fields per dot (rows J * i + k), which makes them
  warpgroup MMAs (default; `_variant="novjoin"` for A/B): the 3.25-bit schedule's mean layer 0.556 -> 0.541 ms on
  the H200 at bf16 precision (2026-12-05). So it does for undequantized 2-bit values under 2- or 4-bit per-token
  keys, read as words too except 2/2 at bf16 (H200, batch 32 x 16K: 4/2 0.406 -> 0.345 ms at bf16 and 0.491 ->
  0.402 at "high", 2/2 0.475 -> 0.396 at "high"; `_variant="vjoin"` for the other one-group layouts), whose codes
  are then unpacked from 16-bit lanes: unpacked from bytes by an 8-bit -> 16-bit inline asm, the joined fields were
  wrong when compiled (H200, 2026-12-05), though right in the interpreter.
- In layers with an 8-bit side, and those per-token layers with joined 2-bit values, the quantized pools are read as
  32-bit words and turned back into bytes where they are used (`as_bytes`), so prefetched tiles cross the loop
  packed, four bytes a register, instead of one register per byte that the inline assembly packed again
  (`_variant="w32"`: every layer's; "nw32": none). Where a block is one page, every block of the loop lies within
  the sequence's pages, so no row is masked (H200, without the selects: 2/2 0.361 -> 0.342 ms at bf16, 4/4 0.451 ->
  0.440 at "high"; `_variant="vmask"` keeps them) except 16-bit values under two value dots per tile ("high" without
  the probability parts side by side, below), whose select keeps their dot's operand in registers (without it 16/16
  took 0.734 -> 1.081 ms). 16-bit values of one-page blocks under one value dot per tile are read by a scalar page
  index with a masked load (pages past the end as zeros; "novzero": a select per element instead).
- Float32 query and probability tiles are split into `parts` bf16 terms for the tensor-core dots (codes are exact
  in bf16), so parts=2 carries ~16 significant bits; parts=1 is plain bf16 (FlashAttention-like precision). Where
  the query rows fit `parts` times into the R padded columns (decode at GQA <= 8; beside stacked keys where their
  plan leaves the room, `_variant="spcols"` making room), the wrapper repeats them and the probability terms sit side
  by side, part k in column group k, so one value dot does what `parts` did; the groups' outputs are added after the
  kernel (H100, batch 32 x 16K at "high", 2026-12-05: 4/4 0.434 -> 0.339 ms, 16/16 0.816 -> 0.781, the schedule's
  kivi8/4 layers 0.861 -> 0.793; `_variant="nopcols"` / `"nospcols"` for A/B).
- 8-bit per-token codes do not fit bf16's mantissa next to the magic offset, so each byte is one f16 operand
  `1024 + code` (default, `eight_bit="f16"`; a `prmt` against 0x64 bytes: one instruction per two operands, one
  dot): the query side of those dots is then split into f16 parts after scaling each query row by a power of two to
  a largest element in [2^13, 2^14) (undone on its scores), and the probability side after scaling p * value scale
  by a power of two taken from the split's largest value scale (a pass over the split's scales before the main loop;
  undone on the output). f16 parts carry 11 significant bits each. `eight_bit="nibbles"` reads each byte as two
  4-bit fields instead (two bf16 dots, weights 1 and 16): 8/8 at batch 32 x 16K on the H200, 1.387 -> 0.710 ms at
  "high" and 1.037 -> 0.593 at bf16 with the word reads (2026-12-05).
- The softmax (`softmax="fixed"`, default where probabilities are bf16 operands, as timed) measures
  probabilities against the maximum of each split's first block, scored once more before the loop, so no block
  takes a maximum over its tokens (they are spread over the warps) or rescales the accumulators
  (`tile_attention.fixed_softmax_step`). A split that overflowed (a non-finite result, or a sum of p from 2^64)
  reports m = +inf, and a second kernel (`_redo_kernel`), whose other programs return at once, recomputes it with
  the running softmax in place. H200, batch 32 x 16K (2026-12-05): 16/16 0.622 -> 0.590 ms and 4/4 0.409 -> 0.369
  at bf16 precision, 2/2 0.566 -> 0.496 at "high", the 3.25-bit schedule's per-channel-key layers 0.834 -> 0.791 at
  "high".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout, triton_params
from pallas_kernels import tile_attention as ta
from pallas_kernels.paged_attention import KERNEL_PRECISIONS


@dataclasses.dataclass(frozen=True)
class _Side:
    """Static description of how one of K or V is read."""

    kind: str  # "full" (16-bit), "token", "channel"
    bits: int
    group: int
    symmetric: bool
    per: int = 1  # codes per byte
    nf: int = 1  # token: unpacked fields per byte (tile_attention.num_fields)
    cb: int = 0  # token: byte columns per column block
    ncb: int = 0  # token: number of column blocks
    ngroups: int = 0  # token: groups along head_dim; channel: groups along the page
    full_bf16: bool = True  # full: stored as bf16 (else split into parts)
    f16: bool = False  # token, 8 bits: one whole-byte field as f16 1024 + code (else two 4-bit nibbles in bf16)

    @property
    def gpb(self) -> int:
        """token: groups per column block (several where one group's bytes are fewer than a block's)."""
        return self.cb * self.per // self.group


def _side(spec: KVSpec, codes, page_size: int, head_dim: int, min_cb: int = 16, eight_bit: str = "nibbles") -> _Side:
    if not spec.quantized:
        return _Side("full", 16, 0, False, full_bf16=codes.dtype == jnp.bfloat16)
    per = ta.codes_per_byte(spec.bits)
    if spec.axis == "token":
        cb = ta.col_block(head_dim, spec.bits, spec.group_size, min_cb)
        f16 = spec.bits == 8 and eight_bit == "f16"
        return _Side(
            "token",
            spec.bits,
            spec.group_size,
            spec.symmetric,
            per=per,
            nf=ta.num_fields(spec.bits, f16),
            cb=cb,
            ncb=head_dim // (cb * per),
            ngroups=head_dim // spec.group_size,
            f16=f16,
        )
    return _Side("channel", spec.bits, spec.group_size, spec.symmetric, per=per, ngroups=page_size // spec.group_size)


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _dot(a, b, trans_a: bool = False):
    """a [M, K] @ b [K, N] (a given as [K, M] when trans_a) -> float32."""
    dims = (((0,) if trans_a else (1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _dot_parts(a, b_parts, trans_a: bool = False):
    acc = None
    for bp in reversed(b_parts):  # smallest terms first
        d = _dot(a, bp, trans_a)
        acc = d if acc is None else acc + d
    return acc


def _asm_field_ptx(bits: int, j: int, f16: bool = False) -> str:
    """PTX for one instance of `magic_fields`' inline assembly: 4 code bytes in, field j's 4 operands out.

    prmt spreads bytes (b0, b1) and (b2, b3) into the 16-bit lanes of two words, then a shift and one lop3
    `(t & mask) | 0x4300` per word make two bf16 operands `128 + field` at once: ~1.5 instructions per operand (the
    prmt is the same for every field), where the element-wise jnp form costs ~4 (widen, shift, mask, or) on one
    16-bit value per 32-bit register. Whole 8-bit codes as f16 (`f16`): the prmt itself pairs each byte with the
    byte 0x64, making two f16 operands `1024 + code` per instruction; 2/4-bit fields as f16 (`f16`) OR in 0x6400.
    """
    if f16 and bits == 8:
        lines = ["{", ".reg .b32 m;", f"mov.b32 m, 0x{ta.MAGIC16_BITS >> 8:02X}{ta.MAGIC16_BITS >> 8:02X}"
                 f"{ta.MAGIC16_BITS >> 8:02X}{ta.MAGIC16_BITS >> 8:02X};",
                 "prmt.b32 $0, $2, m, 0x4140;", "prmt.b32 $1, $2, m, 0x4342;", "}"]  # fmt: skip
        return "\n".join(lines)
    lines = ["{", ".reg .b32 t0, t1, z;", "mov.b32 z, 0;", "prmt.b32 t0, $2, z, 0x4140;", "prmt.b32 t1, $2, z, 0x4342;"]
    lines += _lane_field_ptx([("t0", "t0", "$0"), ("t1", "t1", "$1")], ta.field_bits(bits), j, f16)
    return "\n".join(lines + ["}"])


def _lane_field_ptx(words, fb: int, j: int, f16: bool) -> list[str]:
    """PTX lines taking field j (fb bits wide) of the codes in both 16-bit lanes of each word to operands `magic +
    field`: `shr` by j * fb when j > 0, then one lop3 `(t & mask) | magic` per word. words: (source, shifted, result)
    registers of each word; all shifts come before all lop3s."""
    mask = (1 << fb) - 1
    mb = ta.MAGIC16_BITS if f16 else ta.MAGIC_BITS
    shifts = [f"shr.b32 {t}, {src}, {j * fb};" for src, t, _ in words] if j else []
    lut = f"0x{mask:04X}{mask:04X}, 0x{mb:04X}{mb:04X}, 0xEA"
    return shifts + [f"lop3.b32 {dst}, {t if j else src}, {lut};" for src, t, dst in words]


def _asm_field16_ptx(bits: int, j: int, f16: bool = False) -> str:
    """PTX for `magic_fields(..., wide=True)`: two codes already widened to 16 bits in, field j's 2 operands out (2 or
    4 bits; a shift and one lop3 per two operands). Input and output elements have the same width, so a layout that
    orders a thread's elements by their bit width (Triton's dot-operand layouts may order 8-bit elements unlike
    16-bit ones; the suspected cause of the joined per-token path's wrong compiled outputs, BENCHMARKS.md
    2026-12-05) cannot pair an output lane with another element's code. The shift (at most 6) moves the upper
    lane's low bits to bits 10 and up of the lower lane, outside its field mask."""
    if bits not in (2, 4):
        raise ValueError(f"_asm_field16_ptx: {bits}-bit codes; expected 2 or 4")
    return "\n".join(["{", ".reg .b32 t;", *_lane_field_ptx([("$1", "t", "$0")], bits, j, f16), "}"])


def magic_fields(x, bits: int, asm: bool, f16: bool = False, wide: bool = False) -> list:
    """Every field of a token-axis code tile x (uint8 [rows, cols]) as bf16 `128 + field`, or with `f16` each whole
    8-bit code as f16 `1024 + code` (tile_attention's `magic_operand` for j = 0 .. num_fields - 1). `asm`: by PTX
    inline assembly, four bytes per instance (compiled
    GPU kernels only; the interpreter runs the jnp form, which gives the same bits). One call per field: JAX 0.11's
    Triton lowering of `elementwise_inline_asm` returns a single result. Each output lane depends only on its own
    byte, so however Triton groups a thread's elements into fours (and pads a short last group with undef values,
    which it then drops), the results are the jnp form's, as long as Triton orders a thread's input and output
    elements alike; `wide` (2/4-bit codes) widens the codes to 16 bits first so that input and output elements have
    the same width and that holds in any layout (`_asm_field16_ptx`)."""
    nf = ta.num_fields(bits, f16)
    if not asm:
        return [ta.magic_operand(x, bits, j, f16) for j in range(nf)]
    dtype = jnp.float16 if f16 else jnp.bfloat16
    if wide and bits in (2, 4):
        x16 = x.astype(jnp.uint16)
        return [_ptx(_asm_field16_ptx(bits, j, f16), x16, "=r,r", 2, dtype) for j in range(nf)]
    return [_ptx(_asm_field_ptx(bits, j, f16), x, "=r,=r,r", 4, dtype) for j in range(nf)]


def _ptx(asm: str, x, constraints: str, pack: int, dtype, *more):
    """One PTX inline-assembly instance per `pack` elements of x (and of each of `more`, broadcast to x's shape), one
    result of x's shape in `dtype` (JAX 0.11's Triton lowering of `elementwise_inline_asm` supports a single
    result). Operands narrower than 32 bits are packed into 32-bit registers, element 0 in the lowest bits."""
    args = [x, *(jnp.broadcast_to(y, x.shape) for y in more)]
    return plgpu.elementwise_inline_asm(
        asm, args=args, constraints=constraints, pack=pack, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, dtype)]
    )[0]


CVT_BF16X2_PTX = "cvt.rn.bf16x2.f32 $0, $2, $1;"  # $0 = (high lane: bf16($2), low lane: bf16($1)); $1 is element 0
CVT_F16X2_PTX = "cvt.rn.f16x2.f32 $0, $2, $1;"  # the same lanes, f16
EX2_PTX = "ex2.approx.ftz.f32 $0, $1;"
FMA_PTX = "fma.rn.f32 $0, $1, $2, $3;"


def round_bf16_ptx(x):
    """`tile_attention.round_bf16` by one `cvt.rn.bf16x2.f32` per two elements (compiled GPU kernels only). The
    Triton lowering turns a float32 -> bf16 conversion into an integer emulation of round-to-nearest-even (shift,
    sign-extend, add, permute: ~5 instructions per element); the hardware conversion rounds the same way."""
    hi = _ptx(CVT_BF16X2_PTX, x, "=r,f,f", 2, jnp.bfloat16)
    return hi, hi.astype(jnp.float32)


def round_f16_ptx(x):
    """`tile_attention.round_f16` by one `cvt.rn.f16x2.f32` per two elements (compiled GPU kernels only). Unlike the
    integer form it keeps f16 subnormals (below 2^-14 of tiles scaled to ~2^14: 2^-28 relative); either way the f32
    value returned is exactly the f16 operand's, which is all the split needs."""
    hi = _ptx(CVT_F16X2_PTX, x, "=r,f,f", 2, jnp.float16)
    return hi, hi.astype(jnp.float32)


def exp2_ptx(x):
    """2^x by one `ex2.approx.ftz.f32` (compiled GPU kernels only): jnp.exp2 lowers to the same instruction wrapped
    in a subnormal-range fix-up (compare, 2 conditional multiplies), which only matters for results below 2^-126,
    i.e. probabilities that are 0 to float32 accuracy anyway. Max relative error 2^-22.5 (PTX ISA)."""
    return _ptx(EX2_PTX, x, "=f,f", 1, jnp.float32)


def fma_ptx(a, b, c):
    """a * b + c by one `fma.rn.f32` (compiled GPU kernels only; b and c broadcast to a's shape). The Triton lowering
    keeps a multiply and an add separate (no contraction), two instructions per element of a dequantized tile; the
    fused form rounds once, within an ulp of the two-step one."""
    return _ptx(FMA_PTX, a, "=f,f,f,f", 1, jnp.float32, b, c)


def fma_jnp(a, b, c):
    return a * b + c


DEQ_F16X2_PTX = (  # (a - 1024) * b + c on two f16 lanes: the subtraction is exact, the fma rounds once
    "{\n.reg .b32 t, m;\nmov.b32 m, 0x64006400;\nsub.f16x2 t, $1, m;\nfma.rn.f16x2 $0, t, $2, $3;\n}"
)


def dequant_f16_ptx(c, scale, zero):
    """f16 `1024 + code` operands c -> code * scale + zero in f16 (scale, zero: f16, broadcast to c's shape), two
    lanes per `sub.f16x2` + `fma.rn.f16x2` (compiled GPU kernels only)."""
    return _ptx(DEQ_F16X2_PTX, c, "=r,r,r,r", 2, jnp.float16, scale, zero)


def dequant_f16_jnp(c, scale, zero):
    f32 = jnp.float32
    return ((c.astype(f32) - ta.MAGIC16) * scale.astype(f32) + zero.astype(f32)).astype(jnp.float16)


def _kernel(
    *refs,
    ks: _Side,
    vs: _Side,
    P: int,
    ppb: int,
    pps: int,
    R: int,
    D: int,
    N: int,
    parts: int,
    qparts: int,
    c_scale: float,
    prefetch: bool,
    kdeq: bool = False,
    vdeq: bool = False,
    vhalf: bool = False,
    kstack: int = 0,
    ksub: int = 1,
    qrows: int = 0,
    asm: bool = False,
    variant: str = "",
    kw32: bool = False,
    vw32: bool = False,
    fixed: bool = False,
    vjoin: int = 1,
    pcopies: int = 1,
    split=None,
):
    it = iter(refs)
    nt_ref, pt_ref, q_ref = next(it), next(it), next(it)  # [1], [MPpad], q block (see wrapper)
    qsum_ref = next(it) if ks.kind == "token" else None  # [2, ng, R]
    qinv_ref = next(it) if ks.f16 else None  # [R]: powers of 2 undoing the query's scaling into f16's range
    kc_ref = next(it)  # [N, rows, cols] (this KV head)
    ksc_ref = next(it) if ks.kind != "full" else None
    kz_ref = next(it) if ks.kind != "full" and not ks.symmetric else None
    vc_ref = next(it)
    vsc_ref = next(it) if vs.kind != "full" else None
    vz_ref = next(it) if vs.kind != "full" and not vs.symmetric else None
    o_ref = next(it)  # [nacc, rows_acc, R]
    za_ref = next(it) if vs.kind == "token" else None  # [ng_v, R]
    m_ref, l_ref = next(it), next(it)  # [R], [R]

    TB = ppb * P
    # Token sub-blocks (ksub > 1, stacked channel-axis keys of < 8 bits): byte row r of a key page holds tokens
    # r * ksub + j in field j, so the block's key bytes are read once, in storage order, and field j is sub-block j
    # (every ksub-th token of each page, rows of TBs = TB / ksub); its values are read with row stride ksub.
    TBs, Ps = TB // ksub, P // ksub
    to_parts = functools.partial(
        ta.split_parts, rnd=round_bf16_ptx if asm and "nocvt" not in variant else ta.round_bf16
    )
    to_parts16 = functools.partial(ta.split_parts, rnd=round_f16_ptx if asm else ta.round_f16)
    exp2 = exp2_ptx if asm and "noex2" not in variant else jnp.exp2
    fma = fma_ptx if asm and "nofma" not in variant else fma_jnp
    deq16 = dequant_f16_ptx if asm else dequant_f16_jnp
    defer_z = vs.kind == "token" and vs.ngroups == 1
    p16 = P16_FIXED if fixed else P16_SCALE  # probabilities as f16 operands (small value groups at bf16): p * p16
    # Stacked keys' per-column scales from [kstack, D] block loads, broadcast to the columns (no select chain over
    # the groups): faster for 4- and 8-bit keys, slower with 2-bit keys' four 32-row sub-blocks (H200, BENCHMARKS.md).
    qload = kstack * qrows * pcopies == R and ksub <= 2 and "qselect" not in variant
    # 16-bit values of one-page blocks at bf16 precision, or at "high" with the probability parts side by side
    # (pcopies: one value dot): the page indexed by a scalar and masked by the load (pages past the end read as
    # zeros), so the value dot reads the tile transposed straight from the shared memory its asynchronous copy
    # filled, and no select per element remains (16/16 at batch 32 x 16K on the H200: 0.726 -> 0.614 ms at bf16; on
    # an H100 at "high" with pcopies 0.804 -> 0.781). Blocks of
    # several pages, or two value dots per tile ("high" without pcopies), keep the select: the same masked load
    # there, of [pages, rows, D], was slower (0.765 -> 1.046 ms at "high"; the engine at page 32 too). Ablation:
    # `_variant="novzero"`.
    vzero = vs.kind == "full" and ppb == 1 and (parts == 1 or pcopies > 1) and "novzero" not in variant
    # Dequantized small value groups' per-element scale tiles from [rows, groups] block loads of each column block,
    # broadcast along the group's bytes, instead of a select chain over its groups (`_variant="vselect"`): the same
    # float32 operations, bit for bit, and faster on the H200 (BENCHMARKS.md, 2026-12-05).
    vload = vdeq and vs.group % vs.per == 0 and vs.gpb > 1 and "vselect" not in variant
    split = pl.program_id(2) if split is None else split
    npages = nt_ref[0] // P
    first = split * pps
    nvalid = jnp.clip(npages - first, 0, pps)
    nblk = (nvalid + ppb - 1) // ppb

    # Loop-invariant query tiles.
    if ks.kind == "full" or kdeq:
        qk = [q_ref[p, :, :] for p in range(qparts)]  # [D, R] bf16 each
    elif ks.kind == "token":
        # [cb, R] bf16 each (f16 with whole 8-bit key codes, scaled by 1 / qinv per column)
        qk = [[[q_ref[p, g, j, :, :] for j in range(ks.nf)] for g in range(ks.ngroups)] for p in range(qparts)]
        qsum = [qsum_ref[0, g, :] for g in range(ks.ngroups)]  # [R] f32, exact query sums (zero-points)
        qsum_op = [qsum_ref[1, g, :] for g in range(ks.ngroups)]  # [R] sums of what the dots see (magic offset)
    else:
        q_t = q_ref[...]  # [D, R] f32
        q_once = to_parts(q_t, parts) if variant == "qonce" else None

    tok = jax.lax.broadcasted_iota(jnp.int32, (TBs,), 0)  # row of a (sub-)block; a token when ksub == 1

    def p_parts(x, split_=None):
        """Probabilities x [TBs, R] f32 as value-dot operands: `parts` bf16 (f16 with split_=to_parts16) tiles, or
        with pcopies one tile whose column group k (columns k * C .. (k + 1) * C - 1, C = qrows or, with stacked keys,
        kstack * qrows) holds part k. The wrapper repeated the query rows pcopies times into the padding columns, so
        every group's scores and probabilities are the same and one value dot does what `parts` did; the wrapper adds
        the groups' outputs after the kernel."""
        ps = (split_ or to_parts)(x, parts)
        if pcopies == 1:
            return ps
        col = jax.lax.broadcasted_iota(jnp.int32, (1, R), 1) // (qrows * max(kstack, 1))
        out = ps[0]
        for k in range(1, parts):
            out = jnp.where(col == k, ps[k], out)
        return (out,)

    def per_copy(x):
        """x, a term outside the value dots that every column group of p_parts repeats (zero points times p), divided
        among the groups, which the wrapper adds up again (exact for two groups)."""
        return x if pcopies == 1 else x * (1.0 / pcopies)

    def physical(idx, pages):
        """(pages clamped to the pool, which are valid) for page-table entries `pages` at positions `idx`: entries
        past the sequence's full pages or INVALID read page 0 and are masked by the caller. Callers pass keywords in
        the order each computed them before this helper existed, which kept the lowered Triton IR identical."""
        ok = (idx < npages) & (pages >= 0)
        return jnp.minimum(jnp.where(ok, pages, 0), N - 1), ok

    def block_pages(i):
        """(physical pages of block i [ppb], which are valid)."""
        base = first + i * ppb
        return physical(idx=base + jax.lax.broadcasted_iota(jnp.int32, (ppb,), 0), pages=pt_ref[pl.ds(base, ppb)])

    def load_pages(i):
        return block_pages(i)[0]

    def block_of(i):
        """(first page position of block i, which of its rows are valid [TBs])."""
        base = first + i * ppb
        return base, (base + tok // Ps) < npages

    def keep(valid, x, fill):
        """x [TBs, ...] with invalid rows set to `fill` (nothing to do where valid is None: the caller knows that the
        whole block is valid, see `body`)."""
        if valid is None:
            return x
        return jnp.where(valid[(slice(None),) + (None,) * (x.ndim - 1)], x, fill)

    # Code tiles prefetched one block ahead in registers: the small ones (token-axis, <= 4 bits). 16-bit and 8-bit
    # tiles are 4-8x larger and would spill; they are loaded in the iteration that uses them.
    pref = tuple(
        prefetch and (side.kind == "channel" or (side.kind == "token" and side.bits <= 4)) for side in (ks, vs)
    )

    def sub_rows(j):
        """Rows of a page read for token sub-block j: all of them (ksub == 1), else every ksub-th from j."""
        return slice(None) if ksub == 1 else pl.ds(j, Ps, ksub)

    def block_tiles(i, pages, which, ok=None):
        """Code tiles of a block, () for a side not in `which`. Keys: [TB, cols] for 16-bit and token-axis stores,
        raw bytes [TB, D] in token order for a channel-axis store, or its bytes in storage order [TBs, D] with
        sub-blocks; values: a tuple per sub-block of [TBs, cols] tiles. Codes read as words (`kw32` / `vw32`) have a
        quarter of the columns (see `as_bytes`). ok: which of `pages` are valid, as `block_pages(i)` gave them with
        `pages` (read again from the page table when not given)."""
        ktiles = ()
        kw, vw = (4 if x else 1 for x in (kw32, vw32))  # bytes per element of each pool as the kernel reads it
        if not which[0]:
            pass
        elif ks.kind == "full":
            ktiles = (kc_ref[pages, :, :].reshape(TB, D),)
        elif ks.kind == "token":
            ktiles = tuple(
                kc_ref[pages, :, pl.ds(c * ks.cb // kw, ks.cb // kw)].reshape(TB, ks.cb // kw) for c in range(ks.ncb)
            )
        elif ksub > 1 or ks.per == 1:  # storage order (8-bit: token order): whole pages, no row gather
            ktiles = (kc_ref[pages, :, :].reshape(TBs, D // kw),)
        else:
            ktiles = (channel_raw(kc_ref, ks, first + i * ppb),)
        vtiles = ()
        if not which[1]:
            pass
        elif vs.kind == "full" and vzero:  # one page by a scalar index, past the end read as zeros (masked load)
            # Array indices only (the interpreter's masked load takes no slices); [Ps, D] as loaded, which the dot
            # then reads transposed straight from shared memory.
            ok = block_pages(i)[1] if ok is None else ok
            cols = jax.lax.broadcasted_iota(jnp.int32, (1, D), 1)
            rows = jax.lax.broadcasted_iota(jnp.int32, (Ps, 1), 0)
            idx = pages.reshape(())
            mask = jnp.broadcast_to(ok.reshape(()), (Ps, D))
            vtiles = tuple(
                (plgpu.load(vc_ref.at[idx, rows * ksub + j, cols], mask=mask, other=0).reshape(TBs, D),)
                for j in range(ksub)
            )
        elif vs.kind == "full":
            vtiles = tuple((vc_ref[pages, sub_rows(j), :].reshape(TBs, D),) for j in range(ksub))
        elif vs.kind == "token":
            vtiles = tuple(
                tuple(
                    vc_ref[pages, sub_rows(j), pl.ds(c * vs.cb // vw, vs.cb // vw)].reshape(TBs, vs.cb // vw)
                    for c in range(vs.ncb)
                )
                for j in range(ksub)
            )
        elif vs.per == 1:
            vtiles = ((vc_ref[pages, :, :].reshape(TB, D // vw),),)
        else:
            vtiles = ((channel_raw(vc_ref, vs, first + i * ppb),),)
        return ktiles, vtiles

    def token_params(i, pages):
        """Scales / zeros of a block (prefetched one block ahead), (keys, values per sub-block): see side_params."""

        def side_params(side, sc_ref, z_ref, j):
            """Per-token (scales, zeros) [TBs] f32 per group of sub-block j, or per-channel ones per (page, token
            group)."""
            if side is ks and qload:  # qload: stacked channel-axis keys
                return channel_block_params(sc_ref, z_ref, side, i, pages)
            if side is vs and vload:  # per column block: [TBs, groups in the block] f32

                def cols(ref, c):
                    return (
                        ref[pages, sub_rows(j), pl.ds(c * side.gpb, side.gpb)]
                        .reshape(TBs, side.gpb)
                        .astype(jnp.float32)
                    )

                sc = tuple(cols(sc_ref, c) for c in range(side.ncb))
                return sc, () if z_ref is None else tuple(cols(z_ref, c) for c in range(side.ncb))
            if side.kind == "channel":
                return channel_params(sc_ref, z_ref, side, first + i * ppb)
            if side.kind != "token":
                return (), ()
            sc = tuple(scale_tokens(sc_ref, pages, g, j) for g in range(side.ngroups))
            return sc, () if z_ref is None else tuple(scale_tokens(z_ref, pages, g, j) for g in range(side.ngroups))

        return side_params(ks, ksc_ref, kz_ref, 0), tuple(side_params(vs, vsc_ref, vz_ref, j) for j in range(ksub))

    def page_scalar(base, pp):
        """(physical page, is valid) of page pp of the block; invalid pages' weights are zeroed by the caller."""
        return physical(pages=pt_ref[base + pp], idx=base + pp)

    def channel_raw(c_ref, side: _Side, base):
        """Channel-axis page block of 2/4-bit codes in token order, raw bytes [TB, D]: each byte row gathered once per
        field."""
        t_in = tok % P
        page_tok, _ = physical(pages=pt_ref[base + tok // P], idx=base + tok // P)  # invalid rows: masked later
        return c_ref[page_tok, t_in // side.per, :]  # [TB, D] uint8

    def channel_params(s_ref, z_ref, side: _Side, base):
        """Per (page of the block, token group): (scale [D], zero term [D]) f32; zeros for invalid pages."""
        out = []
        for pp in range(ppb):
            pg, ok = page_scalar(base, pp)
            for tg in range(side.ngroups):
                sc = s_ref[pg, tg, :].astype(jnp.float32)
                zt = ta.zero_term(sc, None if z_ref is None else z_ref[pg, tg, :], side.bits)
                out.append((jnp.where(ok, sc, 0.0), jnp.where(ok, zt, 0.0)))  # a stale page may hold NaN scales
        return tuple(out)

    def channel_block_params(s_ref, z_ref, side: _Side, i, pages):
        """(scale, zero term) [kstack, D] f32 of block i's token groups (page-major), each one load; zeros for
        invalid pages."""
        ok = block_pages(i)[1][:, None, None]
        sc = s_ref[pages, :, :].astype(jnp.float32)  # [ppb, ngroups, D]
        zt = ta.zero_term(sc, None if z_ref is None else z_ref[pages, :, :], side.bits)
        return jnp.where(ok, sc, 0.0).reshape(kstack, D), jnp.where(ok, zt, 0.0).reshape(kstack, D)

    def token_order_codes(x, side: _Side):
        """Channel-axis raw block [TB, D] -> (bf16 operand [TB, D], offset carried per code).

        2/4-bit codes use the magic conversion (operand = 128 + code); 8-bit codes an int->float conversion.
        """
        t_in = tok % P
        if side.bits <= 4 and variant in ("krows0", "kboth"):  # ablation: one field for every row (wrong values)
            return magic_fields(x, side.bits, asm)[0], ta.MAGIC
        if side.bits <= 4:
            return ta.magic_operand_rows(x, side.bits, t_in % side.per), ta.MAGIC
        return ta.codes_to_operand(ta.unpack_field_rows(x, side.bits, t_in % side.per)), 0.0

    def scale_tokens(s_ref, pages, g, j=0):
        return s_ref[pages, sub_rows(j), g].reshape(TBs).astype(jnp.float32)  # [TBs]

    def scores(base, pages, valid, prm, tiles):
        """Scaled scores [TBs, R] of each token sub-block (a list of one unless ksub > 1)."""
        if ks.kind == "full":
            x = tiles[0][0]
            if ks.full_bf16:
                s = _dot_parts(x, qk)
            else:
                s = sum(_dot_parts(xp, qk) for xp in to_parts(x.astype(jnp.float32), parts))
        elif ks.kind == "token":
            s = None
            gpb = ks.gpb
            for cbi in range(ks.ncb):
                x = tiles[0][cbi]
                cs = magic_fields(x, ks.bits, asm, ks.f16)  # 128 + field, bf16 (1024 + code, f16)
                for g in range(cbi * gpb, (cbi + 1) * gpb):
                    d = None
                    for p in reversed(range(qparts)):
                        for j in range(len(cs)):
                            dd = _dot(cs[j], qk[p][g][j])
                            d = dd if d is None else d + dd
                    sc = prm[0][0][g]
                    zt = ta.zero_term(sc, prm[0][1][g] if prm[0][1] else None, ks.bits)
                    t = ta.fold_scores(d, sc, zt, qsum[g])
                    t = t - (ta.magic(ks.f16) * sc)[:, None] * qsum_op[g][None, :]  # the operands' +128 (+1024)
                    s = t if s is None else s + t
            if ks.f16:
                s = s * qinv_ref[...][None, :]
        elif kdeq:
            # Dequantize the block (one FMA per element against per-token rows of the group scales), split it into
            # bf16 parts and run one set of dots instead of re-scaling q per group (slower on the H100: BENCHMARKS.md).
            c, off = token_order_codes(tiles[0][0], ks)  # [TB, D]
            sc_rows = zt_rows = None
            for pp in range(ppb):
                for tg in range(ks.ngroups):
                    sc, zt = prm[0][pp * ks.ngroups + tg]  # [D] each
                    lo = pp * P + tg * ks.group
                    rows = ((tok >= lo) & (tok < lo + ks.group))[:, None]
                    sc_rows = jnp.where(rows, sc[None, :], 0.0 if sc_rows is None else sc_rows)
                    zt_rows = jnp.where(rows, (zt - off * sc)[None, :], 0.0 if zt_rows is None else zt_rows)
            kf = fma(c.astype(jnp.float32), sc_rows, zt_rows)  # [TB, D] keys as the reference dequantizes them
            kp = to_parts(kf, parts)
            s = None
            for a in reversed(range(parts)):
                for b_ in reversed(range(qparts)):
                    if a + b_ < max(parts, qparts):  # lo x lo terms are below float32 rounding of the sum
                        d = _dot(kp[a], qk[b_])
                        s = d if s is None else s + d
        elif kstack:
            # The block's kstack token groups side by side in the query columns: column g * qrows + r is query row r
            # re-scaled by group g's channel scales (the wrapper repeated q), so one dot scores every group, and
            # token t keeps only its own group's columns. Each column then runs its own softmax over its group's
            # tokens (a disjoint share of the pages, like a split), merged exactly by the combine after the kernel.
            if ksub > 1:  # field j of the bytes is sub-block j: PTX unpacking with a constant field, no gather
                cs, off = magic_fields(tiles[0][0], ks.bits, asm), ta.MAGIC  # [TBs, D] each
            else:
                c, off = token_order_codes(tiles[0][0], ks)  # [TB, D]
                cs = [c]
            colg = jax.lax.broadcasted_iota(jnp.int32, (1, R), 1) // qrows  # token group of each column
            colg = colg % kstack if pcopies > 1 else colg  # (the same group in each copy of the stacked columns)
            # Row r of every sub-block is in token group r // (group / ksub) of the block.
            vcol = None if valid is None else valid[:, None]  # first: the masked kernel's IR stays as it was timed
            own = (tok // (ks.group // ksub))[:, None] == colg  # [TBs, R]
            own = own if vcol is None else vcol & own
            if variant == "qonce":  # ablation: the query as loaded, not re-scaled per block (wrong values)
                return [jnp.where(own, _dot_parts(c, q_once) * c_scale, -jnp.inf) for c in cs]
            if qload and pcopies == 1:  # columns g * qrows + r: a broadcast of the [kstack, D] block loads
                sc_c, zt_c = (
                    jnp.broadcast_to(x.T[:, :, None], (D, kstack, qrows)).reshape(D, kstack * qrows) for x in prm[0]
                )
            elif qload:  # columns (c * kstack + g) * qrows + r, for each copy c of the stacked rows (see p_parts)
                sc_c, zt_c = (
                    jnp.broadcast_to(x.T[:, None, :, None], (D, pcopies, kstack, qrows)).reshape(D, R) for x in prm[0]
                )
            else:
                sc_c = zt_c = None
                for g in range(kstack):
                    sc, zt = (x[:, None] for x in prm[0][g])  # [D, 1] each, broadcast along the columns
                    sc_c = jnp.where(colg == g, sc, 0.0 if sc_c is None else sc_c)
                    zt_c = jnp.where(colg == g, zt, 0.0 if zt_c is None else zt_c)
            q_s = to_parts(q_t * sc_c, parts)
            zq = jnp.sum(q_t * zt_c - off * ta.parts_value(q_s), axis=0)  # [R]
            return [jnp.where(own, (_dot_parts(c, q_s) + zq[None, :]) * c_scale, -jnp.inf) for c in cs]
        else:
            c, off = token_order_codes(tiles[0][0], ks)  # [TB, D]
            s = None
            one = variant in ("kgroup1", "kboth")  # ablation: one unmasked dot per block (wrong values)
            for pp in range(1 if one else ppb):
                for tg in range(1 if one else ks.ngroups):
                    sc, zt = prm[0][pp * ks.ngroups + tg]  # [D] each
                    q_s = to_parts(q_t * sc[:, None], parts)  # [D, R]: per-channel scale folded into q
                    zq = jnp.sum(q_t * zt[:, None], axis=0) - off * jnp.sum(ta.parts_value(q_s), axis=0)
                    d = _dot_parts(c, q_s) + zq[None, :]
                    lo = pp * P + tg * ks.group
                    rows = (tok >= lo) & (tok < lo + ks.group)
                    s = d if one else jnp.where(rows[:, None], d, 0.0 if s is None else s)  # groups tile the rows
        return [keep(valid, s * c_scale, -jnp.inf)]

    def value_group_mask(cbi, j, g):
        """bool [cb]: which value rows of column block cbi's field j hold a channel of group g."""
        return ta.group_mask_of_block(vs.cb, cbi, vs.bits, vs.group, j, g)

    def values(valid, vprm, vt, p, accs, zaccs, rows_ok):
        """Adds one (sub-)block's p-weighted values to the accumulators; vprm: its value scales (see token_params),
        vt: its value tiles; rows_ok: which rows are valid, even where `valid` is None."""
        if vs.kind == "full":
            x = vt[0]
            if not vzero:  # pages past the end may hold anything (NaN)
                # Kept where every row is valid too: without it, the two-part value dots ("high") of one-page blocks
                # read the tile straight from shared memory, 16/16 0.734 -> 1.081 ms (H200, 2026-12-05).
                x = jnp.where(rows_ok[:, None], x, jnp.zeros_like(x))
            pp_ = p_parts(p)
            if vs.full_bf16:
                accs[0] = accs[0] + _dot_parts(x, pp_, trans_a=True)
            else:
                for xp in to_parts(x.astype(jnp.float32), parts):
                    accs[0] = accs[0] + _dot_parts(xp, pp_, trans_a=True)
        elif vdeq:
            # Small value groups: dequantize each field tile (one FMA per element against the token's group scale)
            # and split it into bf16 parts, so p is split once per block instead of re-scaled and re-split per group,
            # and no per-group zero-point sums over tokens are needed. The per-element scale / offset tiles are built
            # once per column block (a byte column's group is the same in every field when the group size is a
            # multiple of the codes per byte), and rows past the end get scale and zero-point 0 as [TB] vectors (a
            # stale page may hold NaN scales), so no per-element select remains for them.
            # vhalf (bf16 precision, f16-stored scales): each field tile is dequantized in f16 arithmetic against f16
            # scale / zero tiles (no magic offset term: the operand's 1024 is subtracted exactly first), and p * 2^14
            # is the f16 right operand (2^14 keeps small probabilities above f16's subnormals; undone on the output).
            gpb = vs.gpb
            vmask = keep(valid, p, 0.0)
            pv = to_parts16(vmask * p16, 1) if vhalf else p_parts(vmask)
            if not vload:
                sc_rows = [keep(valid, vprm[0][g], 0.0) for g in range(vs.ngroups)]  # [TBs] each
                zt_rows = [
                    keep(valid, ta.zero_term(vprm[0][g], vprm[1][g] if vprm[1] else None, vs.bits), 0.0)
                    for g in range(vs.ngroups)
                ]
                if vhalf:  # exact: the stored scales and zeros are f16
                    sc_rows, zt_rows = ([x.astype(jnp.float16) for x in xs] for xs in (sc_rows, zt_rows))

            def group_tiles_loaded(cbi, j):
                """`group_tiles` from column block cbi's [TBs, groups] loads, each group's value repeated over its
                group // per bytes."""
                sc = keep(valid, vprm[0][cbi], 0.0)
                zt = keep(valid, ta.zero_term(vprm[0][cbi], vprm[1][cbi] if vprm[1] else None, vs.bits), 0.0)
                if vhalf:
                    sc, off = sc.astype(jnp.float16), zt.astype(jnp.float16)
                elif ta.field_weight(vs.bits, j, vs.f16) != 1.0:  # 8-bit high nibble: the
                    off = -ta.MAGIC * sc  # zero-point is on the low one
                else:
                    off = zt - ta.magic(vs.f16) * sc
                reps = vs.group // vs.per
                return tuple(
                    jnp.broadcast_to(x[:, :, None], (TBs, gpb, reps)).reshape(TBs, gpb * reps) for x in (sc, off)
                )

            def group_tiles(cbi, j):
                """(scale, offset of the magic operand) per element of field j of column block cbi: [TB, cb] or
                [TB, 1]."""
                if vload:
                    return group_tiles_loaded(cbi, j)
                sc_t = zt_t = None
                for g in range(cbi * gpb, (cbi + 1) * gpb):
                    sc, zt = sc_rows[g][:, None], zt_rows[g][:, None]
                    if gpb > 1:
                        keep = value_group_mask(cbi, j, g)[None, :]
                        sc = jnp.where(keep, sc, 0.0 if sc_t is None else sc_t)
                        zt = jnp.where(keep, zt, 0.0 if zt_t is None else zt_t)
                    sc_t, zt_t = sc, zt
                if vhalf:
                    return sc_t, zt_t
                if ta.field_weight(vs.bits, j, vs.f16) != 1.0:  # 8-bit high nibble: the zero-point
                    return sc_t, -ta.MAGIC * sc_t  # is on the low one
                return sc_t, zt_t - ta.magic(vs.f16) * sc_t

            shared = vs.group % vs.per == 0

            def dot_items(cbi, cs):
                """(operand, scale tile, offset tile, accumulator) of each dot of column block cbi's fields cs."""
                once, gt = {}, []  # fields of one weight share their tiles where the group spans whole bytes
                for j in range(vs.nf):
                    key = ta.field_weight(vs.bits, j, vs.f16) if shared else j
                    if key not in once:
                        once[key] = group_tiles(cbi, j)
                    gt.append(once[key])
                return [(cs[j], *gt[j], cbi * vs.nf + j) for j in range(vs.nf)]

            for cbi in range(vs.ncb):
                items = dot_items(cbi, magic_fields(vt[cbi], vs.bits, asm, vs.f16 or vhalf))
                for k in range(0, vs.nf, vjoin):  # vjoin fields per dot (rows vjoin * i + f: see the wrapper)
                    ops = [
                        (deq16(c, sc_t, off_t),) if vhalf else to_parts(fma(c.astype(jnp.float32), sc_t, off_t), parts)
                        for c, sc_t, off_t, _ in items[k : k + vjoin]
                    ]  # per field: its dequantized operand, or its bf16 parts [TB, cb]
                    vp = tuple(ta.interleave_fields([o[i] for o in ops]) for i in range(len(ops[0])))
                    a = items[k][3] // vjoin
                    if vhalf:
                        accs[a] = accs[a] + _dot(vp[0], pv[0], True)
                        continue
                    d = None
                    for a_ in reversed(range(parts)):
                        for b_ in reversed(range(len(pv))):  # one with pcopies (its lo x lo terms are extra)
                            if a_ + b_ < parts:  # lo x lo terms are below float32 rounding of the sum
                                dd = _dot(vp[a_], pv[b_], trans_a=True)  # [vjoin * cb, R]
                                d = dd if d is None else d + dd
                    accs[a] = accs[a] + d
        elif vs.kind == "token":
            gpb = vs.gpb
            for cbi in range(vs.ncb):
                x = vt[cbi]
                if variant == "vtrans":  # transpose the raw bytes, then unpack: A operand [cb, TB] as loaded
                    xt = x.T
                    cs = [ta.magic_operand(xt, vs.bits, j, vs.f16) for j in range(vs.nf)]
                else:
                    # 128 + field, bf16 (1024 + code, f16); joined, from 16-bit codes (see magic_fields)
                    cs = magic_fields(x, vs.bits, asm, vs.f16, wide=vjoin > 1)
                cs = [ta.interleave_fields(cs[k : k + vjoin]) for k in range(0, len(cs), vjoin)]  # (see the wrapper)
                for g in range(cbi * gpb, (cbi + 1) * gpb):
                    sc = vprm[0][g]
                    zt = ta.zero_term(sc, vprm[1][g] if vprm[1] else None, vs.bits)
                    zt = per_copy(zt)
                    # Scale folded into the probabilities; with f16 operands also vkv (see value_scaling), so that
                    # p * scale * vkv < 2^14, the accumulators are scaled by vkv and the offset term by 1 / vkv.
                    pg_ = keep(valid, p * (sc * vkv[0] if vs.f16 else sc)[:, None], 0.0)
                    pparts = p_parts(pg_, to_parts16 if vs.f16 else to_parts)
                    off = ta.magic_offset(vs.bits, vs.f16) * ta.parts_value(pparts)  # operand offset, per token
                    if vs.f16:
                        off = off * vkv[1]
                    for j in range(len(cs)):
                        if variant == "vrows":  # out [R, cb] = p'^T @ codes: codes as the right operand, natural
                            d = None
                            for pp_ in reversed(pparts):
                                dd = _dot(pp_.T, cs[j]).T
                                d = dd if d is None else d + dd
                        else:
                            d = _dot_parts(cs[j], pparts, trans_a=variant != "vtrans")  # [vjoin * cb, R]
                        if gpb > 1:
                            d = jnp.where(value_group_mask(cbi, j, g)[:, None], d, 0.0)
                        accs[cbi * len(cs) + j] = accs[cbi * len(cs) + j] + d
                    # Zero-point and offset terms: accumulated per token and summed over tokens once after the loop
                    # (one group), or summed per block (several groups: per-token accumulators would spill).
                    zterm = keep(valid, p * zt[:, None], 0.0) - off
                    zaccs[g] = zaccs[g] + (zterm if defer_z else jnp.sum(zterm, axis=0))
        else:
            c, off = token_order_codes(vt[0], vs)  # [TB, D]
            for pp in range(ppb):
                for tg in range(vs.ngroups):
                    sc, zt = vprm[pp * vs.ngroups + tg]  # [D] each
                    lo = pp * P + tg * vs.group
                    rows = (tok >= lo) & (tok < lo + vs.group)
                    rows = rows if valid is None else rows & valid
                    pm = jnp.where(rows[:, None], p, 0.0)
                    pmp = p_parts(pm)
                    d = _dot_parts(c, pmp, trans_a=True) - off * jnp.sum(ta.parts_value(pmp), axis=0)[None, :]
                    accs[0] = accs[0] + d * sc[:, None] + zt[:, None] * per_copy(jnp.sum(pm, axis=0))[None, :]
        return accs, zaccs

    def loads_only(tiles, prm, accs):
        """Ablation: read what the kernel reads (code tiles, scales), reduce it trivially."""
        tot = jnp.zeros((), jnp.float32)
        for x in jax.tree.leaves((tiles, prm)):
            x = x.astype(jnp.float32)
            while x.ndim:  # one axis at a time (a 2-D block-loaded scale tile reduced at once did not lower)
                x = jnp.sum(x, axis=-1)
            tot = tot + x
        accs[0] = accs[0] + tot
        return accs

    def as_bytes(tiles):
        """`block_tiles`' tiles with codes read as words (`kw32` / `vw32`) turned back into bytes where they are used:
        a prefetched tile then crosses the loop in whole registers, four bytes each, instead of one register per byte
        that the unpacking's inline assembly (four bytes per instance) had to pack again."""
        kt, vt = tiles
        if kw32:
            kt = tuple(ta.bytes_of_words(x) for x in kt)
        if vw32:
            vt = tuple(tuple(ta.bytes_of_words(x) for x in sub) for sub in vt)
        return kt, vt

    def body(i, carry, masked: bool):
        # Software-pipelined by hand: the page ids of block i+1 and the per-token scales of block i were loaded
        # one iteration ahead (Triton's pipeliner streams the codes but not these small, gathered loads, whose
        # latency was otherwise exposed on every block).
        m, l, accs, zaccs, pages, pages_next, prm, tiles = carry
        prm_next = token_params(i + 1, pages_next)
        tiles_next = block_tiles(i + 1, pages_next, pref)
        pages_nn = load_pages(i + 2)
        base, rows_ok = block_of(i)
        valid = rows_ok if masked else None
        # Loaded from freshly read page ids (not the carried ones) so that Triton's pipeliner can stream them.
        fresh, ok = block_pages(i) if not all(pref) else (pages, None)
        now = block_tiles(i, fresh, tuple(not x for x in pref), ok=ok)
        tiles = tuple(t if x else n for t, n, x in zip(tiles, now, pref, strict=True))
        nxt = (pages_next, pages_nn, prm_next, tiles_next)
        if variant == "loads":
            return m, l, loads_only(tiles, prm, list(accs)), zaccs, *nxt
        btiles = as_bytes(tiles)
        s = scores(base, pages, valid, prm, btiles)
        if variant == "nosoftmax":  # ablation: no max/sum reductions, no exp
            m_new, alpha, p, l_new = m, jnp.ones_like(m), s, l
        elif fixed:  # m is the split's fixed reference: no maximum over the block's tokens, nothing to rescale
            (p, l_new), m_new, alpha = ta.fixed_softmax_step(m, l, s, exp2), m, None
        else:
            m_new, alpha, p, l_new = ta.online_softmax_step_deferred(m, l, s, exp2)
        if variant == "novalues":  # ablation: scores and softmax only
            accs = [a + sum(jnp.sum(x, axis=0) for x in p)[None, :] for a in accs]  # keeps p live (no slicing)
            return m_new, l_new, accs, zaccs, *nxt
        if alpha is not None:
            accs = [a * alpha[None, :] for a in accs]
            if vs.kind == "token" and not vdeq:
                zaccs = [z * (alpha[None, :] if defer_z else alpha) for z in zaccs]
        for j in range(ksub):
            accs, zaccs = values(valid, prm[1][j], btiles[1][j], p[j], accs, zaccs, rows_ok)
        return m_new, l_new, accs, zaccs, *nxt

    def value_scaling():
        """(vkv, 1 / vkv): the power of two 2^(13 - e) for the largest value scale of this split's valid tokens in
        [2^e, 2^(e + 1)), so that p * scale * vkv < 2^14 (p <= 1) fits f16 with room to spare while the largest terms
        sit near 2^13, 2^37 above where f16's subnormals begin. One pass over the split's scales (~1.5% of its code
        bytes at 8 bits) before the main loop; stale pages are masked, as there."""

        def body(i, acc):
            pages = load_pages(i)
            _, valid = block_of(i)
            for j in range(ksub):
                for g in range(vs.ngroups):
                    acc = jnp.maximum(acc, jnp.where(valid, jnp.abs(scale_tokens(vsc_ref, pages, g, j)), 0.0))
            return acc

        vmax = jnp.max(jax.lax.fori_loop(0, nblk, body, jnp.zeros((TBs,), jnp.float32)))
        e = ((jax.lax.bitcast_convert_type(vmax, jnp.int32) >> 23) & 0xFF) - 127  # -127 for 0 (and subnormals)
        e = jnp.clip(e, -113, 113)  # both powers below stay normal float32 numbers
        top = 13 + P16_FIXED_SHIFT if fixed else 13  # fixed: p <= 2^18 (see P16_FIXED)
        return tuple(jax.lax.bitcast_convert_type((127 + x) << 23, jnp.float32) for x in (top - e, e - top))

    vkv = value_scaling() if vs.f16 and not vdeq else None
    if vs.kind == "token":
        accs = [jnp.zeros((vs.cb * vjoin, R), jnp.float32) for _ in range(vs.ncb * vs.nf // vjoin)]
        zaccs = [jnp.zeros((TBs, R) if defer_z else (R,), jnp.float32) for _ in range(vs.ngroups)]
    else:
        accs = [jnp.zeros((D, R), jnp.float32)]
        zaccs = []
    m0 = jnp.full((R,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((TBs, R), jnp.float32)  # per-token partial sums of p (see online_softmax_step_deferred)
    pages0 = load_pages(0)
    tiles0 = block_tiles(0, pages0, pref)
    prm0 = None  # token_params(0) is built here only when fixed: where it was, the running kernel's IR stays as timed
    if fixed:
        # The reference: the maximum of block 0's scores (its key tiles read once more unless prefetched). A block
        # past the end (nblk == 0) scores -inf and gives reference 0; its results are masked below.
        prm0 = token_params(0, pages0)
        k0 = tiles0 if pref[0] else block_tiles(0, pages0, (True, False))
        base0, valid0 = block_of(0)
        m0 = ta.fixed_reference(scores(base0, pages0, valid0, prm0, as_bytes(k0)))
    carry = (m0, l0, accs, zaccs, pages0, load_pages(1), prm0 if fixed else token_params(0, pages0), tiles0)
    # With one page a block, every block of the loop lies within the sequence's pages (nblk = nvalid), so no row needs
    # a validity select (H200, batch 32 x 16K: 2/2 at bf16 0.361 -> 0.342 ms, 4/4 0.357 -> 0.351; `_variant="vmask"`
    # keeps them). 16-bit values keep theirs (see `values`). Blocks of several pages keep them all: a loop split into
    # whole blocks and a masked last one was longer or spilled registers offline (benchmarks/triton_sass.py).
    masked = ppb > 1 or "vmask" in variant
    m, l, accs, zaccs, *_ = jax.lax.fori_loop(0, nblk, functools.partial(body, masked=masked), carry)
    out_mul = vkv[1] if vkv is not None else 1.0 / p16 if vhalf else None
    for a, acc in enumerate(accs):
        o_ref[a, :, :] = acc if out_mul is None else acc * out_mul
    zsums = [jnp.sum(z, axis=0) if defer_z else z for z in zaccs]
    for g, z in enumerate(zsums):
        za_ref[g, :] = z
    if fixed:
        lsum = jnp.sum(l, axis=0)
        # Overflow against the fixed reference (a score ~127 above it, or p-weighted sums past float32) shows as a
        # non-finite result, and a sum of p past `ta.FIXED_L_LIMIT` (a score ~64 above it) is taken as one too, so that
        # the combine's sums over splits stay far from float32's limit; such a split reports m = +inf, and the redo
        # kernel (`_redo_kernel`) recomputes it with the running softmax. A split with no tokens reports m = -inf, as
        # the running softmax does.
        bad = jnp.where(lsum < ta.FIXED_L_LIMIT, 0.0, 1.0)  # NaN too
        bad = bad + sum(jnp.sum(jnp.where(jnp.isfinite(x), 0.0, 1.0), axis=0) for x in accs)
        bad = bad + sum(jnp.where(jnp.isfinite(z), 0.0, 1.0) for z in zsums)
        m = jnp.where(jnp.max(bad) > 0, jnp.inf, jnp.where(nblk > 0, m, -jnp.inf))
    m_ref[...] = m
    l_ref[...] = lsum if fixed else jnp.sum(l, axis=0)


def _redo_kernel(*refs, n_in: int, **kw):
    """The running-softmax kernel for the splits that the fixed-reference pass (`_kernel(fixed=True)`) marked with
    m = +inf; other programs return at once, leaving that pass's results, which arrive aliased to the outputs (refs:
    the `n_in` inputs, that pass's outputs, then the outputs)."""
    n_out = (len(refs) - n_in) // 2
    ins, prev, outs = refs[:n_in], refs[n_in : n_in + n_out], refs[n_in + n_out :]
    split = pl.program_id(2)  # outside the branch: interpret mode evaluates program ids only at the kernel's top level

    @pl.when(jnp.max(prev[-2][...]) == jnp.inf)
    def _():
        _kernel(*ins, *outs, **kw, split=split)


def unsupported(q, k_codes, v_codes, *, k_spec: KVSpec, v_spec: KVSpec) -> str | None:
    """Why this kernel cannot run these shapes/specs (the dispatcher then falls back to the reference under
    backend="auto"), or None. Page size and head_dim must be powers of two >= 16; a per-token packed row of one
    group must span at least 16 bytes (tensor-core tile)."""
    d = q.shape[-1]
    page_size = layout.page_size_of(k_spec, k_codes, d)
    if not (_pow2(page_size) and page_size >= 16 and _pow2(d) and d >= 16):
        return f"page_size={page_size} and head_dim={d} must be powers of 2, at least 16"
    for spec in (k_spec, v_spec):
        if spec.quantized and spec.axis == "token":
            if not _pow2(spec.group_size) or d // ta.codes_per_byte(spec.bits) < 16:
                return f"token-axis group {spec.group_size} / head_dim {d} at {spec.bits} bits is not supported"
    return None


MAX_1BYTE_POOL_ELEMENTS = 2**31  # int32 offsets reach size - 1 (see check_index_range)


def check_index_range(**pools) -> None:
    """Raises ValueError for a 1-byte pool array of more than 2^31 and at most 2^32 bytes.

    JAX 0.11's Triton lowering switches to 64-bit offsets only above 2^32 *bytes*, but offsets count elements in a
    signed int32: a uint8 pool in that range overflows and the kernel reads out of bounds (seen on an H100 as
    CUDA_ERROR_ILLEGAL_ADDRESS with an 8-bit layer of 4 GiB). Larger arrays get 64-bit offsets and are fine.
    """
    for name, arr in pools.items():
        nbytes = arr.size * arr.dtype.itemsize
        if arr.dtype.itemsize == 1 and arr.size > MAX_1BYTE_POOL_ELEMENTS and nbytes <= 2**32:
            raise ValueError(
                f"{name} {tuple(arr.shape)} {arr.dtype} is {nbytes / 2**30:.2f} GiB: 1-byte pools of 2-4 GiB per layer "
                "overflow the Triton lowering's 32-bit offsets; plan a smaller KV budget (--kv_cache_gb), or shard "
                "the KV heads over more devices (--mesh), so each layer's pool stays under 2 GiB per device"
            )


UNPACKS = ("auto", "asm", "jnp")


def _rocm_runtime() -> bool:
    """True when this process's GPU backend is ROCm (AMD GPUs), where PTX inline assembly cannot run."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend (e.g. lowering for a GPU from a CPU host)
        return False
    return bool(gpus) and "rocm" in str(getattr(gpus[0].client, "platform_version", "")).lower()


def _use_asm(unpack: str, interpret: bool) -> bool:
    """Whether the kernel unpacks codes with PTX: "auto" means yes when compiled for an NVIDIA GPU."""
    if unpack not in UNPACKS:
        raise ValueError(f"unpack={unpack!r}: expected one of {UNPACKS}")
    if unpack == "asm" and interpret:
        raise ValueError("unpack='asm' runs PTX and cannot run under interpret=True; use 'auto' or 'jnp'")
    return unpack == "asm" or (unpack == "auto" and not interpret and not _rocm_runtime())


CHANNEL_KEYS = ("stack", "fold", "dequant")
P16_SCALE = 2.0**14  # probabilities (<= 1) times this as f16 operands: 2^-38 and up stay normal-range f16
# Against the fixed softmax's reference p may exceed 1: at bf16 precision its f16 operands are scaled 2^16 lower, so p
# up to 2^18 (a score 18 above the reference, base 2) fits f16 and a larger one overflows to inf, which the kernel
# detects and redoes. Terms below 2^-12 of the largest then lose bits to f16's subnormals: absolute errors of 2^-23
# of the largest term each, far below the bf16 rounding (2^-9) of every operand at this precision.
P16_FIXED_SHIFT = -16
P16_FIXED = P16_SCALE * 2.0**P16_FIXED_SHIFT
EIGHT_BITS = ("nibbles", "f16")
KERNELS = ("auto", "triton", "mgpu")


# page sizes where `mosaic_route` sends layers with no 8-bit side (2- and 4-bit pairs) to the Mosaic GPU kernel
MOSAIC_NARROW_PAGES = (32, 64)


def mosaic_route(q, k_codes, v_codes, v_scale, *, k_spec: KVSpec, v_spec: KVSpec, interpret: bool, capability=None):
    """Whether `kernel="auto"` runs the Mosaic GPU kernel: compiled on a Hopper GPU (compute capability 9.x;
    `capability` overrides the default device's, for tests), a layer that kernel reads (`paged_attention_mgpu.
    unsupported`: decode, per-token keys and values of 2, 4 or 8 bits, one group per head, pages of 16 to 128
    tokens), for 8-bit values f16 value scales (its f16 probabilities x a scale stay in f16's range), and for layers
    with no 8-bit side pages of 32 or 64 tokens, where it was timed faster.

    Measured against this kernel on an H100 (BENCHMARKS.md, 2026-12-06). With an 8-bit side, at batch 32 x 16K, ms:
    8/8 at pages of 16 0.630 vs 0.638, 32 0.508 vs 0.611, 64 0.41-0.43 vs 0.59-0.66 (81-87% of copy bandwidth), 128
    0.483 vs 0.574; 8/4 0.581 vs 0.689, 0.476 vs 0.565, 0.387-0.411 vs 0.55, 0.454 vs 0.502. 2- and 4-bit pairs
    (4/4, 2/2, 4/2) once V's operand went to registers (`value_regs`, 23:23-23:29 UTC): at pages of 64 0.67-0.83x
    this kernel's time at each of batch 8 and 32 x 1K, 16K and 32K and batch 128 x 16K (4/4 at 32 x 16K 0.246 vs
    0.333); at the
    engine's default pages of 32 (22:51 UTC, the same kernel but for the wait before V's unpack, not timed on its
    own) 0.64-0.98x at 34 of 36 shapes (batch 8, 32, 128 x 1K, 4K, 16K, 32K), 1.10x at 4/2 batch 8 x 4K. Pages
    of 16 and 128 were last timed before those changes (1.20-1.56x slower at 16, 0.83-1.09x at 128), so 2- and
    4-bit pairs stay here for them. A route by the page table's width would misplace short sequences in a table
    sized for long ones."""
    from pallas_kernels import paged_attention_mgpu

    if interpret:
        return False
    if 8 not in (k_spec.bits, v_spec.bits) and k_codes.shape[2] not in MOSAIC_NARROW_PAGES:
        return False
    if v_spec.bits == 8 and v_scale.dtype != jnp.float16:
        return False
    if capability is None:
        capability = paged_attention_mgpu.gpu_capability()
    if not str(capability or "").startswith("9."):
        return False
    return paged_attention_mgpu.unsupported(q, k_codes, v_codes, k_spec=k_spec, v_spec=v_spec) is None


SOFTMAXES = ("running", "fixed")
# `_variant` items (comma-separated): ablations for benchmarks (some give wrong values by design: see the kernel) and
# the A/B opposites of measured defaults.
VARIANTS = (
    "loads", "nosoftmax", "novalues", "vtrans", "vrows", "krows0", "kgroup1", "kboth", "nocvt", "noex2", "nofma",
    "vcb16", "kgather", "qonce", "qselect", "vselect", "novhalf", "novzero", "w32", "nw32", "fixedall", "vjoin",
    "novjoin", "vmask", "nopcols", "spcols", "nospcols",
)  # fmt: skip


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_config(batch: int, kv_heads: int, max_pages: int, page_size: int, full: bool = False) -> tuple[int, int]:
    """(pages_per_block, num_splits) defaults: blocks of ~64 tokens; enough programs to cover the GPU a few times.

    `full` (16-bit K and V, which stream at the bandwidth limit): 17 splits where that stays within ~32 programs per
    SM and leaves each split at least 4 blocks. Measured on the H100 (16/16, page 64, ms at splits 5 / 8 / 17 / 32):
    batch 32 x 16K 0.908 / 0.850 / 0.829 / 0.870 (JAX's bf16 kernel 0.882), batch 32 x 32K 1.709 / 1.623 / 1.565 /
    1.625, batch 8 x 32K 0.457 / 0.570 / 0.445 / 0.456; batch 128 is best at 5. The quantized kernels, bound by
    issue rate, hardly change with splits.
    """
    ppb = max(1, min(64 // page_size, _next_pow2(max_pages)))
    nblocks = -(-max_pages // ppb)
    programs = batch * kv_heads
    splits = -(-1056 // programs)  # 8 x the 132 SMs of an H100
    if full:
        splits = max(splits, min(17, -(-4224 // programs), nblocks // 4))
    return ppb, max(1, min(nblocks, splits))


def stack_plan(
    ks: _Side,
    vs: _Side,
    rows: int,
    R: int,
    page_size: int,
    max_pages: int,
    ppb: int,
    pages_per_block: int | None,
    channel_keys: str,
    variant: str,
    parts: int,
) -> tuple[int, int, int]:
    """(pages_per_block, kstack, ksub): `ppb` is the default block size, `pages_per_block` the caller's (or None).

    kstack: the block's token groups stacked side by side in the query columns (`channel_keys="stack"`), or 0 where
    groups x query rows do not fit the R padded rows (one dot per group). ksub > 1: 2/4-bit stacked keys read in
    storage order as token sub-blocks (one per field of their bytes, see the kernel), with 16-bit or per-token values;
    each sub-block is a dot of ppb * page_size / ksub rows, which must be at least 16 (an MMA tile). By default the
    block is widened up to 64 rows per sub-block where the stacked groups still fit, and sub-blocks are used where
    that gives at least 64 rows (32 at bf16 precision, `parts == 1`): measured on an H200 (BENCHMARKS.md), 32-row
    sub-blocks were slower than token order at parts=2. `_variant="kgather"`: always token order (one byte row
    gathered per token).
    """
    if pages_per_block:
        ppb = pages_per_block
    if ks.kind != "channel" or channel_keys != "stack":
        return ppb, 0, 1
    items = variant.split(",")
    rows = rows * (parts if parts > 1 and "spcols" in items else 1)  # room for the probability parts' copies
    ksub = ks.per if ks.per > 1 and ks.group % ks.per == 0 and vs.kind != "channel" and "kgather" not in items else 1
    fit = R // (ks.ngroups * rows)  # pages whose groups x rows fit the padding
    if ksub > 1 and fit and not pages_per_block:
        want = max(1, min(64 * ksub // page_size, _next_pow2(max_pages)))
        wide = max(ppb, min(want, 1 << (fit.bit_length() - 1)))
        if wide * page_size >= (32 if parts == 1 else 64) * ksub:
            ppb = wide
        else:
            ksub = 1
    kstack = ppb * ks.ngroups if ppb * ks.ngroups * rows <= R else 0
    if not kstack or ppb * page_size < 16 * ksub:
        ksub = 1
    return ppb, kstack, ksub


@functools.partial(
    jax.jit,
    static_argnames=(
        "k_spec",
        "v_spec",
        "sm_scale",
        "interpret",
        "pages_per_block",
        "num_splits",
        "num_warps",
        "num_stages",
        "max_registers",
        "parts",
        "prefetch",
        "max_rows",
        "channel_keys",
        "small_value_groups",
        "precision",
        "unpack",
        "eight_bit",
        "softmax",
        "kernel",
        "_variant",
    ),
)
def paged_attention(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    page_table,
    num_tokens,
    *,
    k_spec: KVSpec,
    v_spec: KVSpec,
    sm_scale: float,
    interpret: bool = False,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    max_registers: int | None = None,
    parts: int = 2,
    prefetch: bool = True,
    max_rows: int = 64,
    channel_keys: str = "stack",
    small_value_groups: str = "dequant",
    precision: str = "high",
    unpack: str = "auto",
    eight_bit: str = "f16",
    softmax: str = "fixed",
    kernel: str = "auto",
    _variant: str = "",
):
    """Paged attention of q [B, Hq, Tq, D] over packed pages; same contract as `paged_attention_reference`.

    `kernel`: "auto" (default) runs the Mosaic GPU kernel (`paged_attention_mgpu`, its own defaults; the tuning
    arguments below are this Triton kernel's) where `mosaic_route` says it is the faster one, else this kernel;
    "triton" always this kernel; "mgpu" always the Mosaic GPU one (a ValueError naming what it cannot read).

    Returns (out [B, Hq, Tq, D] float32 normalized over the pages, lse [B, Hq, Tq] float32, base e); out = 0 and lse =
    -inf where num_tokens == 0. Tuning: `pages_per_block` pages per loop step (power of 2; default `default_config`'s
    ~64 tokens, widened for per-channel keys read in token sub-blocks, see `stack_plan`), `num_splits` programs per
    (sequence, KV head) along the pages, Triton `num_warps` / `num_stages`, and `parts` bf16 terms for float32
    query/probability operands (1 = bf16 precision, 2 ~ 16 bits, 3 ~ float32); `precision="bf16"` means parts=1 (the
    dispatcher's serving option). Where the query rows fit `parts` times into the padded rows (decode at GQA <= 8),
    the probability terms share one value dot, side by side in those rows (see `pcopies` in the wrapper).
    `max_registers`: a cap on registers per thread (a multiple of 8; `triton_params`), None for the compiler's
    choice. Timed on an H100 (BENCHMARKS.md, 2026-12-05), 128 registers ran 4 programs per SM instead of 3 and was
    no faster (4/4 +2%, 8/8 +12%, 2/2 -1 to -5%): occupancy is not what limits these kernels, so it is off.
    Per-channel (KIVI) keys are read as codes against a query re-scaled per token group:
    all of a block's groups in one dot, side by side in the query rows' padding (`channel_keys="stack"`, where the
    block's groups x query rows fit in the padded rows; "fold" otherwise), one dot per group (`"fold"`), or dequantized
    in the kernel and split into `parts` bf16 terms (`"dequant"`); per-token values with several groups per head are
    dequantized (`small_value_groups="dequant"`) or folded into p (`"fold"`). Defaults are the fastest measured
    (BENCHMARKS.md: the KIVI layout ablation on an H100, "stack" against "fold" on an H200). `unpack`: how per-token
    codes become tensor-core operands, "asm" (PTX inline assembly, four bytes per instruction sequence), "jnp"
    (element-wise jnp ops) or "auto" (asm when compiled, jnp under `interpret` or on a ROCm GPU, which cannot run PTX);
    both give the same bits. With asm the kernel also rounds float32 to bf16 (`round_bf16_ptx`, same bits) and computes
    exp2 (`exp2_ptx`) by single PTX instructions. `eight_bit`: how 8-bit per-token codes meet the tensor cores,
    "f16" (default: each byte one f16 operand `1024 + code`, one dot, against f16 query / probability tiles scaled by
    powers of two into f16's range: the query per row by its largest element, the probabilities by the largest value
    scale of the split) or "nibbles" (two 4-bit fields as bf16 operands, two dots per code). `softmax`: "fixed"
    (default: probabilities against the maximum of each split's first block, with no per-block maximum over tokens,
    a reduction across warps, and no rescaling of the accumulators; a split whose results overflowed is recomputed by
    a second kernel with the running softmax, in place, so the results are the same up to rounding) or "running" (the
    online softmax). "fixed" applies wherever probabilities are bf16 operands, as the H200 timed it (BENCHMARKS.md,
    2026-12-05: 16/16 0.622 -> 0.590 ms and 4/4 0.409 -> 0.369 at bf16 precision, 2/2 0.566 -> 0.496 at "high", the
    3.25-bit schedule's per-channel-key layers 0.834 -> 0.791 at "high", 0.830 -> 0.809 on an H100, where only its
    2/2 layers were 1.7% slower). Probabilities that are f16
    operands (8-bit per-token values as f16, small value groups dequantized in f16 at bf16 precision) keep the running
    softmax unless `_variant="fixedall"`: timed, fixedall was 6-9% faster on the schedule's layers, but f16 leaves the
    fixed reference 18 bits of headroom and real scores rise further in 0.2-2.5% of splits (SmolLM2; BENCHMARKS.md
    2026-12-05), each then computed twice. f16 probabilities at "high" keep it always.

    One program holds at most `max_rows` query rows (GQA group x query tokens; its tiles live in registers and shared
    memory, and a 128-token prefill chunk at GQA 4 would not fit): longer query chunks are cut into pieces of
    `max(1, max_rows // group)` tokens, one kernel call each (every query token sees the same pages, so the pieces
    are independent).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
    if kernel == "mgpu" or (
        kernel == "auto"
        and mosaic_route(q, k_codes, v_codes, v_scale, k_spec=k_spec, v_spec=v_spec, interpret=interpret)
    ):
        from pallas_kernels import paged_attention_mgpu

        args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens)
        return paged_attention_mgpu.paged_attention(
            *args, k_spec=k_spec, v_spec=v_spec, sm_scale=sm_scale, precision=precision, interpret=interpret
        )
    kw = dict(
        k_spec=k_spec,
        v_spec=v_spec,
        sm_scale=sm_scale,
        interpret=interpret,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        max_registers=max_registers,
        parts=parts,
        prefetch=prefetch,
        channel_keys=channel_keys,
        small_value_groups=small_value_groups,
        asm=_use_asm(unpack, interpret),
        eight_bit=eight_bit,
        softmax=softmax,
        variant=_variant,
    )
    if precision not in KERNEL_PRECISIONS:
        raise ValueError(f'precision={precision!r}: expected one of {KERNEL_PRECISIONS} ("auto" is the dispatcher\'s)')
    if precision == "bf16":
        kw["parts"] = 1
    if channel_keys not in CHANNEL_KEYS:
        raise ValueError(f"channel_keys={channel_keys!r}: expected one of {CHANNEL_KEYS}")
    if small_value_groups not in ("dequant", "fold"):
        raise ValueError(f"small_value_groups={small_value_groups!r}: expected 'dequant' or 'fold'")
    if eight_bit not in EIGHT_BITS:
        raise ValueError(f"eight_bit={eight_bit!r}: expected one of {EIGHT_BITS}")
    if softmax not in SOFTMAXES:
        raise ValueError(f"softmax={softmax!r}: expected one of {SOFTMAXES}")
    unknown = [x for x in _variant.split(",") if x and x not in VARIANTS]
    if unknown:
        raise ValueError(f"_variant={_variant!r}: unknown item(s) {unknown}; expected items of {VARIANTS}")
    pools = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens)
    tq = q.shape[2]
    step = max(1, max_rows // (q.shape[1] // k_codes.shape[0]))
    if tq <= step:
        return _paged_attention_rows(q, *pools, **kw)
    outs = [_paged_attention_rows(q[:, :, t : t + step], *pools, **kw) for t in range(0, tq, step)]
    return jnp.concatenate([o for o, _ in outs], axis=2), jnp.concatenate([x for _, x in outs], axis=2)


def _paged_attention_rows(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    page_table,
    num_tokens,
    *,
    k_spec: KVSpec,
    v_spec: KVSpec,
    sm_scale: float,
    interpret: bool,
    pages_per_block: int | None,
    num_splits: int | None,
    num_warps: int,
    num_stages: int,
    max_registers: int | None,
    parts: int,
    prefetch: bool,
    channel_keys: str,
    small_value_groups: str,
    asm: bool,
    eight_bit: str,
    softmax: str,
    variant: str,
):
    """One kernel call over all query rows of q [B, Hq, Tq, D] (see `paged_attention`)."""
    b, hq, tq, d = q.shape
    h, n = k_codes.shape[:2]
    page_size = layout.page_size_of(k_spec, k_codes, d)
    reason = unsupported(q, k_codes, v_codes, k_spec=k_spec, v_spec=v_spec)
    if reason:
        raise ValueError(reason)
    check_index_range(k_codes=k_codes, v_codes=v_codes)
    ks = _side(k_spec, k_codes, page_size, d, eight_bit=eight_bit)
    # Dequantized small value groups: column blocks of >= 32 bytes (several groups each, told apart by per-element
    # scale tiles). A 16-byte block is a 16-row MMA operand, which Triton computes on all 4 warps at once (4x the
    # tensor-core instructions of the work); 32 rows split over the warps (BENCHMARKS.md).
    vdeq = v_spec.quantized and v_spec.axis == "token" and v_spec.group_size < d and small_value_groups == "dequant"
    # vhalf: small value groups dequantized in f16 arithmetic at bf16 precision, where the stored scales and zeros are
    # f16 (so every dequantized value lies within f16's range: between stored f16 minimum and maximum); default,
    # `_variant="novhalf"` turns it off. Its 8-bit codes are whole-byte f16 operands.
    vhalf = (
        vdeq
        and parts == 1
        and "novhalf" not in variant
        and v_scale.dtype == jnp.float16
        and (v_zero is None or v_zero.dtype == jnp.float16)
        and v_spec.group_size % ta.codes_per_byte(v_spec.bits) == 0
    )
    vs = _side(
        v_spec,
        v_codes,
        page_size,
        d,
        min_cb=32 if vdeq and "vcb16" not in variant else 16,
        eight_bit="f16" if vhalf else eight_bit,
    )
    hg = hq // h
    rows = hg * tq
    R = max(16, _next_pow2(rows))
    mp = page_table.shape[1]
    ppb0, splits0 = default_config(b, h, mp, page_size, full=ks.kind == vs.kind == "full")
    ppb, kstack, ksub = stack_plan(ks, vs, rows, R, page_size, mp, ppb0, pages_per_block, channel_keys, variant, parts)
    nblocks = -(-mp // ppb)
    splits = min(num_splits or splits0, nblocks)
    bps = -(-nblocks // splits)
    splits = -(-nblocks // bps)
    pps = bps * ppb
    # Two spare blocks of INVALID entries: the loop reads page ids two blocks ahead.
    pt = jnp.full((b, splits * pps + 2 * ppb), -1, jnp.int32).at[:, :mp].set(page_table.astype(jnp.int32))
    nt = num_tokens.astype(jnp.int32)

    kdeq = ks.kind == "channel" and channel_keys == "dequant"
    items = variant.split(",")
    # pcopies: probabilities split into `parts` bf16 terms ("high") share one value dot, part k in column group k,
    # where the query rows (with stacked keys: all kstack copies of them) fit `parts` times into the padded rows
    # (decode at GQA <= 8): the query rows are repeated, so each group scores the same, and the groups' value outputs
    # are added below. One value dot per operand instead of `parts` (`_variant="nopcols"` for A/B): at batch 32 x 16K
    # on an H100 (2026-12-05, ms) 4/4 0.434 -> 0.339, 2/2 0.389 -> 0.340, 8/8 0.699 -> 0.597, 16/16 0.816 -> 0.781.
    # Stacked per-channel keys: where the stacking plan leaves room for the copies anyway (the 3.25-bit schedule's
    # kivi2/2 and kivi8/4 layers; H100, batch 32 x 16K at "high", 2026-12-05: 0.936 -> 0.873 and 0.872 -> 0.811 ms;
    # `_variant="nospcols"` for A/B). `_variant="spcols"` makes the plan leave room where the groups filled the
    # padding, with fewer groups per block: timed the same day, kivi4/2 0.742 -> 0.858 and kivi4/4 0.819 -> 0.894
    # ms (read in token order, one page a block), so it stays opt-in.
    stack_ok = not kstack or "nospcols" not in items
    pcopies = parts if parts > 1 and stack_ok and parts * rows * max(kstack, 1) <= R and "nopcols" not in items else 1
    # Query rows: r = (head in group) * tq + token, repeated kstack times (stacked keys), all of that pcopies times;
    # transposed to [D, R] and padded.
    qf = q.astype(jnp.float32).reshape(b, h, rows, d)
    if kstack or pcopies > 1:
        qf = jnp.concatenate([qf] * max(kstack, 1) * pcopies, axis=2)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, R - qf.shape[2]), (0, 0)))
    q_t = jnp.swapaxes(qf, -1, -2)  # [B, H, D, R]
    qparts = 1 if q.dtype == jnp.bfloat16 else parts
    args = [nt, pt]
    specs = [
        pl.BlockSpec((1,), lambda i, j, s: (i,)),
        pl.BlockSpec((None, splits * pps + 2 * ppb), lambda i, j, s: (i, 0)),
    ]
    if ks.kind == "full" or kdeq:
        qk = jnp.stack(ta.split_parts(q_t, qparts), axis=2)  # [B, H, qparts, D, R]
        args.append(qk)
        specs.append(pl.BlockSpec((None, None, qparts, d, R), lambda i, j, s: (i, j, 0, 0, 0)))
    elif ks.kind == "token":
        if ks.f16:  # each row scaled by a power of two to a largest element in [2^13, 2^14): f16's range
            e = jnp.clip(jnp.frexp(jnp.max(jnp.abs(q_t), axis=-2))[1], -110, 128)  # max |q| in [2^(e-1), 2^e)
            q_t = q_t * jnp.ldexp(jnp.float32(1.0), 14 - e)[..., None, :]
        qk, qsum = ta.arrange_q_token(q_t, ks.bits, ks.group, ks.f16)  # [B, H, ng, F, cb, R], [B, H, ng, R]
        qk_parts = ta.split_parts(qk, qparts, rnd=ta.round_f16 if ks.f16 else ta.round_bf16)
        # Each field's operand is 128 + field, so its dot carries 128 * sum of the (weighted, bf16-split) query block.
        qsum_op = jnp.sum(ta.parts_value(qk_parts), axis=(-3, -2))  # [B, H, ng, R]
        qsum = jnp.stack([qsum, qsum_op], axis=2)  # [B, H, 2, ng, R]
        qk = jnp.stack(qk_parts, axis=2)
        qspec = pl.BlockSpec((None, None, qparts, ks.ngroups, ks.nf, ks.cb, R), lambda i, j, s: (i, j, 0, 0, 0, 0, 0))
        args += [qk, qsum]
        specs += [qspec, pl.BlockSpec((None, None, 2, ks.ngroups, R), lambda i, j, s: (i, j, 0, 0, 0))]
        if ks.f16:
            args.append(jnp.ldexp(jnp.float32(1.0), e - 14))  # [B, H, R]: the kernel's qinv
            specs.append(pl.BlockSpec((None, None, R), lambda i, j, s: (i, j, 0)))
    else:
        args.append(q_t)
        specs.append(pl.BlockSpec((None, None, d, R), lambda i, j, s: (i, j, 0, 0)))
    # vjoin: per-token values whose column blocks are narrower than a warpgroup MMA's 64 rows (2-bit codes of a
    # 128-channel head: 32 bytes; small value groups' 32-byte blocks) join J fields per dot (rows J * i + k: field
    # J * j + k of byte i), so the value dots can be warpgroup MMAs instead of warp-level ones. Default for
    # dequantized small value groups (H200, 2026-12-05: the 3.25-bit schedule's mean layer 0.556 -> 0.541 ms at bf16)
    # and for undequantized 2-bit values of one group under 2- or 4-bit per-token keys, whose codes are then read as
    # words too (below) except for 2/2 at bf16 precision: batch 32 x 16K on the H200 (2026-12-05, ms, one field a dot
    # -> joined): 2/2 0.342 at bf16 (0.417 -> 0.348 on the H100) and 0.475 -> 0.396 at "high", 4/2 0.406 -> 0.345 and
    # 0.491 -> 0.402; offline each then needs at most 168 registers, so 3 programs share an SM instead of 2.
    # `_variant="vjoin"` for other one-group layouts, "novjoin" for A/B. The undequantized codes are unpacked from
    # 16-bit lanes when joined (see magic_fields).
    vjoin, joined, joined_words = 1, False, False
    if vdeq:
        joined = "novjoin" not in items
    elif vs.kind == "token" and vs.gpb == 1:
        timed = ks.kind == "token" and ks.bits in (2, 4) and vs.bits == 2 and vs.cb == 32
        joined = "vjoin" in items or (timed and "novjoin" not in items)
        joined_words = timed and joined and not (ks.bits == 2 and parts == 1)
    if joined and vs.cb < 64 and variant not in ("vtrans", "vrows") and vs.nf % min(vs.nf, 64 // vs.cb) == 0:
        vjoin = min(vs.nf, 64 // vs.cb)
    # Quantized codes read as 32-bit words and turned back into bytes in the kernel (`as_bytes`): by default both
    # pools of a layer with an 8-bit side (8/8 at batch 32 x 16K, bf16 precision, on the H200: 1.037 -> 0.906 ms as
    # nibbles, 0.893 -> 0.593 as f16 operands; the schedule's 8-bit-key, 4-bit-value layers 0.722 -> 0.661) and of the
    # per-token layers with joined 2-bit values named above, and no other (per-token 4/4 was 6-14% slower with the
    # running softmax, and no faster with the fixed one: 0.351 -> 0.352 ms; the schedule's other layers unchanged);
    # every pool with
    # `_variant="w32"`, none with "nw32".
    words = "w32" in items or ("nw32" not in items and (8 in (k_spec.bits, v_spec.bits) or joined_words))
    kw32, vw32 = (words and side.kind != "full" for side in (ks, vs))
    for arr, as_words in ((k_codes, kw32), (k_scale, 0), (k_zero, 0), (v_codes, vw32), (v_scale, 0), (v_zero, 0)):
        if as_words:  # uint8 [.., cols] -> uint32 [.., cols / 4]
            arr = jax.lax.bitcast_convert_type(arr.reshape(*arr.shape[:-1], arr.shape[-1] // 4, 4), jnp.uint32)
        if arr is not None:
            args.append(arr)
            specs.append(pl.BlockSpec((None, *arr.shape[1:]), lambda i, j, s, nd=arr.ndim: (j,) + (0,) * (nd - 1)))

    if vs.kind == "token":
        nacc, arows = vs.ncb * vs.nf // vjoin, vs.cb * vjoin
    else:
        nacc, arows = 1, d
    out_shape = [jax.ShapeDtypeStruct((b, h, splits, nacc, arows, R), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, nacc, arows, R), lambda i, j, s: (i, j, s, 0, 0, 0))]
    if vs.kind == "token":
        out_shape.append(jax.ShapeDtypeStruct((b, h, splits, vs.ngroups, R), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, vs.ngroups, R), lambda i, j, s: (i, j, s, 0, 0)))
    for _ in range(2):
        out_shape.append(jax.ShapeDtypeStruct((b, h, splits, R), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, R), lambda i, j, s: (i, j, s, 0)))

    kernel_kw = dict(
        ks=ks,
        vs=vs,
        P=page_size,
        ppb=ppb,
        pps=pps,
        R=R,
        D=d,
        N=n,
        parts=parts,
        qparts=qparts,
        c_scale=float(sm_scale) * ta.LOG2E,
        variant=variant,
        prefetch=prefetch,
        kdeq=kdeq,
        vdeq=vdeq,
        vhalf=vhalf,
        kstack=kstack,
        ksub=ksub,
        qrows=rows,
        asm=asm,
        kw32=kw32,
        vw32=vw32,
        vjoin=vjoin,
        pcopies=pcopies,
    )
    call = functools.partial(
        pl.pallas_call,
        grid=(b, h, splits),
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=triton_params.compiler_params(num_warps, num_stages, max_registers),
    )
    name = f"kv_paged_attention_k{k_spec.bits}{ks.kind[0]}_v{v_spec.bits}{vs.kind[0]}"
    # softmax="fixed" (default): probabilities against a fixed per-split reference (block 0's maximum), then the
    # running softmax again for the splits where that overflowed (m = +inf), in place. Default wherever probabilities
    # are bf16 operands, as timed on the H200: 16-bit and per-token keys, and per-channel (KIVI) keys at "high" (the
    # 3.25-bit schedule's mean layer 0.834 -> 0.791 ms, every layer kind 4-9% faster; on an H100 0.830 -> 0.809, its
    # 2/2 layers 1.7% slower; 2026-12-05). Probabilities that
    # are f16 operands (8-bit per-token values as f16, small value groups dequantized in f16 at bf16 precision): only
    # with `_variant="fixedall"`, because their scaling, lowered for p > 1 (P16_FIXED), leaves 18 bits above the
    # reference, and on SmolLM2's real scores 0.2-2.5% of (KV head, split) programs rise further (largest rise 36
    # bits; benchmarks/fixed_softmax_reach.py, BENCHMARKS.md 2026-12-05), so nearly every layer would run its redo
    # kernel, where bf16 probabilities (64 bits of headroom) never did. At "high" f16 probabilities keep it always
    # (two f16 parts scaled for p > 1 would lose the low one to f16's subnormals), as do the ablations that replace it.
    f16p = vs.f16 or vhalf  # probabilities as f16 operands
    fixed = (
        softmax == "fixed"
        and (not f16p or "fixedall" in items)
        and (parts == 1 or not vs.f16)
        and variant not in ("loads", "nosoftmax", "novalues")
    )
    if fixed:
        res = call(functools.partial(_kernel, **kernel_kw, fixed=True), in_specs=specs, name=name + "_fixed")(*args)
        res = call(
            functools.partial(_redo_kernel, **kernel_kw, n_in=len(args)),
            in_specs=specs + out_specs,
            input_output_aliases={len(args) + i: i for i in range(len(out_specs))},
            name=name + "_redo",
        )(*args, *res)
    else:
        res = call(functools.partial(_kernel, **kernel_kw), in_specs=specs, name=name)(*args)
    if pcopies > 1:  # column group k holds what part k of the probabilities weighted; m and l are the same in each
        cg = rows * max(kstack, 1)
        res = [sum(x[..., k * cg : (k + 1) * cg] for k in range(pcopies)) for x in res[:-2]] + [
            x[..., :cg] for x in res[-2:]
        ]
    rc = res[0].shape[-1]  # R, or rows after the above
    if vs.kind == "token":
        o, za, m, l = res
        if vjoin > 1:  # [.., ncb, nf / J, cb, J, R] -> per field
            o = jnp.swapaxes(o.reshape(b, h, splits, vs.ncb, vs.nf // vjoin, vs.cb, vjoin, rc), -2, -3)
        o = o.reshape(b, h, splits, vs.ncb, vs.nf, vs.cb, rc)
        o = ta.unarrange_out_token(o, vs.bits, vs.group, d, vs.f16)
        za = jnp.repeat(jnp.swapaxes(za, -1, -2), vs.group, axis=-1)  # [B, H, S, R, D]
        o = o + za
    else:
        o, m, l = res
        o = jnp.swapaxes(o[:, :, :, 0], -1, -2)  # [B, H, S, R, D]
    if kstack:  # a column per (token group, row): each group's columns are one more share for the combine to merge
        o = o[:, :, :, : kstack * rows].reshape(b, h, splits * kstack, rows, d)
        m, l = (x[..., : kstack * rows].reshape(b, h, splits * kstack, rows) for x in (m, l))
    out, lse = ta.combine_splits(o, m, l)  # [B, H, R, D], [B, H, R]
    out = out[:, :, :rows].reshape(b, hq, tq, d)
    lse = lse[:, :, :rows].reshape(b, hq, tq)
    return out, lse
