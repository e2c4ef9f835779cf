"""Paged decode attention on Mosaic GPU (Hopper): TMA page copies, codes unpacked into warpgroup-MMA operands.

The GPU dispatcher runs it for the per-token decode layers it reads on Hopper (`paged_attention_gpu.mosaic_route`,
`kernel="auto"`), where it is the faster kernel: with an 8-bit side at every page size it reads (on an H100 at batch
32 x 16K, 2026-12-06, BENCHMARKS.md: 8/8 0.41-0.46 ms against the Triton kernel's 0.59-0.66, 81-87% of copy
bandwidth; 8/4 0.39-0.41 against 0.55; 4/8, 8/2, 2/8 1.4-1.8x faster; at every batch, 8-128, and context, 1K-32K,
timed; and batch 128 x 32K, whose 4 GiB 8-bit pool the Triton lowering's 32-bit offsets refuse), and for 2- and
4-bit pairs at pages of 32 and 64 (since its score tile has the GQA group's width and V's operand goes straight to
registers: 0.67-0.83x the Triton kernel's time at pages of 64 at the 21 shapes timed (batches 8-128, contexts
1K-32K), 4/4 at batch 32 x 16K 0.243-0.246 ms against 0.333, 75% of copy bandwidth; 0.64-0.98x at 34 of 36 shapes
at pages of 32). 2- and 4-bit pairs at pages of 16 and 128 stay on the Triton kernel (last timed before those
changes: 1.20-1.56x slower at 16). The Triton kernel covers every other layout.
`kernel="mgpu"` there, or `benchmarks/attention.py --tunings '[{"kernel":"mgpu"}]'`, runs this one for any pair it
reads. Why it exists: the Triton kernel reads 4/4 pages at ~55% of copy bandwidth and its stall profile shows each
block's MMA fences waiting on loads that land in registers, while Mosaic GPU's TMA streams the same pages through
shared memory at 85% (`benchmarks/tma_stream.py`). Here the copies are TMA's, several pages deep, and no fence waits
for them. Measured on an H100 (BENCHMARKS.md, batch 32 x 16K): correct, and slower than the Triton kernel: 1.6x at
first (2026-12-05, 4/4 0.535 against 0.328 ms, the same for 2-, 4-bit and two or four pages in flight: the per-page
chain below, in one warpgroup, is the limit, not the copies), 1.39x with the fixed softmax reference (2026-12-06,
0.452 against 0.325 ms), 1.05x since it unpacks four code bytes a register (2026-12-06, 4/4 0.368 against 0.351 ms;
2/2 and 4/2 1.01-1.06x): Nsight counted 787 instructions per warp per page before that change, 586 after (the Triton
kernel: 449); 0.97x since the splits that overflow the fixed softmax are redone by a second kernel rather than under
a `lax.cond` over the whole call, whose predicate XLA reads on the host every call (2026-12-06, 4/4 0.362 -> 0.334
ms against 0.345); 0.93x since the overflow flag reads the sum of p alone where that bounds the p-weighted sums
(`split_overflowed`; traced, a 4/4 call 0.326 -> 0.315 ms on the GPU, 0.326 ms timed against 0.351); and since the
page pipeline is written here rather than with `plgpu.emit_pipeline` (2026-12-06 evening, the old code timed in the
same runs: 2/2 0.329 -> 0.291 ms, 8/8 0.441-0.448 -> 0.424-0.431, 4/4 0.315-0.333 -> 0.311-0.321; ptxas 133-139
registers a thread instead of 147), at pages of 64 4/4 0.83-0.92x the Triton kernel's time, 2/2 0.83x, 4/2 0.88x
(at pages of 32: 0.92x, 1.03x, 1.08x). What limits it is one warpgroup's serial chain per page (dependency
waits, the MMA wait and copy-issue barriers) with 3 warpgroups an SM. Four programs a block (`warpgroups=4`, 512
threads) hold ptxas to 128 registers a thread, so that an SM runs 4 chains: 4/4 1.04x faster (0.306 against 0.319
ms, 4 spilled registers' worth), but 2/2 and 4/2 1.4x slower (~50 registers' worth spilled). The score tile then
held each query head twice (16 columns), so every per-page softmax step ran twice; with the group's 8 columns
(2026-12-06 night, the old code in the same call) 4/4 0.324 -> 0.274-0.281 ms, 2/2 0.292 -> 0.246-0.254, 4/2
0.304 -> 0.249-0.265, 8/8 unchanged, ptxas 104-117 registers a thread; four programs a block no longer spill and
take 4/4 to 0.250 ms (72% of copy bandwidth), 2/2 the same as one, 4/2 1.08x slower: still opt-in. V's operand
then went through shared memory (~400 of ~3,100 cycles a page); loaded straight into registers (`value_regs`, the
same call on another H100) 4/4 0.265 -> 0.243 ms (75.5% of copy bandwidth, 3.64x JAX's bf16 kernel), 2/2 0.247 ->
0.228, 4/2 0.249 -> 0.227, 8/8 the same, and four programs a block no faster (4/4 0.247, 2/2 0.226, 4/2 0.244);
ptxas took 141-161 registers a thread (one program a block; counted before the wait that retires the previous
page's value MMA ahead of V's unpack was added). Then a call was two kernels (the fixed pass, and the redo of the
splits that overflowed, whose other programs returned at once) and nine other launches a timed call (the benchmark
loop's own included), one of which read the partial outputs of both; as one kernel that redoes its own splits and
writes its [group, D] output in head-dim order, and six other launches (2026-12-07, the old code in the same call
on one H100): 4/4 0.253 -> 0.240 ms (76.6% of copy bandwidth, 3.74x JAX's bf16 kernel; the kernel alone 0.213 ms,
86% of copy bandwidth on its bytes), 2/2 0.237 -> 0.232, 4/2 0.235 -> 0.231, 8/8 0.424 both (its online softmax
never had a redo); 147 registers a thread, no spills. The step's scale and zero-point rows then read from shared
memory under the score MMA, beside V's unpack, rather than after its wait (2026-12-07, the old code in the same call
on one H100, 100 calls a timing): 4/4 0.224 -> 0.222 ms (81% of copy bandwidth, 3.76x JAX's bf16 kernel at 0.834
ms), 2/2 0.222 -> 0.215 (3.88x). Retiring the value MMA at the end of its own step instead of leaving it in flight
was no faster (0.223 and 0.216). The stream alone (`benchmarks/tma_stream.py`, no attention, same call) takes 0.208
ms for 4/4 and 0.129 for 2/2, whether a page's scale and zero-point rows are two copies or one. Traced with the
loop's copy wait and refill named (b32 x 8K): ~2,600 cycles a page for both pairs; the refill's six copies take
~250-350 of them on warp 0, the copy wait ~100 (2/2) to ~200 (4/4); one barrier arrival a step instead of Pallas's
128 a copy was correct and no faster (BENCHMARKS.md, "Where a page's cycles go").

Scope (everything else raises ValueError naming what is supported): decode (one query token), per-token integer
keys and values of 2, 4 or 8 bits with one group per head (`group_size == head_dim`), symmetric or not, head_dim 64 or
128, GQA groups up to 8, pages of 16, 32, 64 or 128 tokens; precision "high" (query and probabilities each two bf16
terms) or "bf16". Same contract as `paged_attention_reference` (pages only). Either side may be mode `int_block`
(`pallas_kernels.modes.int_block`) at pages of 64: each page of that side is one block, its code rows stored
swizzled and then its scale and zero-point rows, copied whole in one plain TMA copy into a slot padded to 1 KB (two
copies a page for both sides, where mode `int`'s pools take six); the code tile is read through a swizzled view of
the slot (`_block_tile_mgpu`; V^T's `ldmatrix` addresses are a swizzled tile's anyway) and the rows through a 16-bit
view (`_block_row_mgpu`). Compiled on an H100 it equals the reference (`tests/test_int_block.py`, 2026-12-07); at
batch 32 x 16K, 2/2 and 4/2 take 0.91-0.92x mode `int`'s time, 4/4 0.99x (BENCHMARKS.md).

One program per (sequence, KV head, split of its pages), one warpgroup; one program a block, or four (`warpgroups`).
Splits may differ by one page (any count from 1 to the table's pages), and each program copies its split's slice of the
page table into shared memory first (`table_smem`; else every page copy's index is a global-memory read on the step's
path). The page pipeline's length is dynamic: pages past the sequence's length are never copied. The MMAs work on tiles
of 64 token rows: a page of 128 tokens is two tiles, and pages of 16 or 32 share one (a step copies 4 or 2 pages, and
each warp, whose 16 rows lie in one page, loads its rows from that page's slot: `_load_pages_mgpu`; scale rows under
TMA's 128-byte minimum are copied 128 bytes wide from a flat view of their pool). Per tile (64 tokens):

- keys, transposed orientation: scores^T [64 tokens, 8 columns] = K [64, D] @ q^T [D, 8]; the columns are the GQA
  group padded to 8, so the MMA's 64 rows are tokens and no query row is padding (at "high" q's two bf16 terms side
  by side, one MMA of 16 columns, its halves summed: `one_score_mma`). K is the A
  operand in registers: the code tile is loaded four bytes of a row a register (Mosaic GPU's 8-bit MMA layout);
  per register each field is masked out of all four bytes at once (after one shift for bf16), and one `prmt` puts
  two masked bytes under bf16 128.0's exponent byte (`0x4300 | code` = 128 + code, no int-to-float instruction),
  128 then subtracted (exact) (`_operand_words_mgpu`, inline Mosaic GPU; `word_unpack=False`: element by element,
  `_operand`). The fields land where the 16-bit MMA layout puts each thread's columns, the head's dims in a fixed
  permutation (`field_permutation`), which the wrapper applies to q instead. Scores = scale x the dot + zero-point
  x sum(q);
- softmax (`softmax="fixed"`, the default): probabilities against a fixed reference, each split's first-page
  maximum (base 2), so after the first page there is no maximum across the four warps and nothing to rescale; each
  thread also keeps the largest of its own scores (one max an element a page). A split that overflows (a score
  ~127 above the reference, or sums of p from 2^64; never seen on real scores) is run again by its own program
  against the split's largest score (p <= 1), the same code with the reference given: no second kernel, overflow
  flag or select on the call's path (`softmax="running"`: the online softmax, a maximum across the 64 rows per
  page and rescaled sums);
- values: out^T [D, 16] += V^T [D, 64] @ P [64, 16]: V^T's operand is loaded straight into the MMA's registers
  (`value_regs`, `_value_operand_mgpu`): the head dims are permuted so that each thread's lie in one 16-bit word of
  a token's code row, so `ldmatrix.trans` hands each thread its word of two consecutive tokens, the MMA register's
  two columns, in one register, then unpacked as K's are (without `value_regs`: built as K's while the score MMA
  runs and staged through shared memory, the only place the MMA takes a transposed A from); P = p x the token's
  value scale, its
  first bf16 term in columns 0-7 and the second in 8-15 (summed at the end); the zero-point term and the sum of
  p accumulate per row, reduced once. With the fixed reference the value MMA accumulates into one accumulator for
  the whole split and is left in flight: the next page's key work runs under it.

8-bit codes: a code byte does not fit bf16's 7 mantissa bits, so 8-bit keys and q, and 8-bit values and p, are
f16 operands (`key_f16`, `value_f16`, on by default there): one `prmt` puts two whole code bytes under f16 1024.0's
exponent byte, one packed subtract leaves the codes, no mask or shift. f16 probabilities take the online softmax
(f16's range leaves a fixed reference too little headroom on real scores; see `paged_attention`'s `softmax`).

Options built to shorten that chain (2026-12-06; tested against the reference interpreted and compiled; on an H100
all of them together took 4/4 from 0.452 to 0.445 ms, f16 keys unpack 19% faster; BENCHMARKS.md): `key_f16` (keys
and q as f16: f16's 10 mantissa bits hold a whole code byte, so each field is masked in place with no shift, its
power of two folded into q), `pages_per_step=2` (two pages share one step's MMA waits, barriers and fence),
`approx_math`, and Mosaic GPU's profiler over the named regions of the chain (`profile_dir`;
`benchmarks/mgpu_trace.py` sums it).

Each program ends by summing p's two terms' columns, adding the zero-point term, and storing its [group, D] output
with the rows put back in head-dim order and transposed (each thread its own elements, `_store_rows_mgpu`); the
wrapper combines the splits exactly, element-wise for up to 16 splits (`ta.combine_splits`, `split_by_split`). So a
call is the kernel and a few small XLA launches (q's two terms, its sums, the page table's slices, the combine).
Under `interpret` (Mosaic GPU's CPU interpreter, how the tests run it) the key operand and V^T's go through shared
memory, as the interpreter takes MMA operands only from there; V^T's `ldmatrix` plan is checked on the CPU by a
lane-by-lane numpy simulation instead (`tests/test_paged_attention_mgpu.py`).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax.specs import KVSpec
from pallas_kernels import tile_attention as ta
from pallas_kernels.modes.int_block import swizzle_rows
from pallas_kernels.paged_attention import KERNEL_PRECISIONS, validate

TILE = 64  # token rows of one MMA tile
PAGES = (16, 32, 64, 128)  # page sizes it reads: pages under 64 tokens share a tile (each warp's 16 rows in one page)
PAGE = 64  # the page size it was first built and measured for
GROUP = 8  # query heads per KV head at most: the GQA group, padded to 8 columns
COLS = 2 * GROUP  # the value MMA's columns: p's two bf16 terms side by side (the score MMA's are the group's, GROUP)
MAGIC, MAGIC_VALUE = ta.MAGIC_BITS, ta.MAGIC  # bf16 128.0: OR-ing a code of up to 7 bits into it gives 128 + code
# f16 1024.0: its 10 mantissa bits hold a whole code byte, so fields need no shift
MAGIC_F16, MAGIC_F16_VALUE = ta.MAGIC16_BITS, ta.MAGIC16
Q_F16_TOP = 2.0**14  # f16 keys: each query row is scaled by a power of two to put its largest element near this
LOG2E = math.log2(math.e)
SOFTMAXES = ("fixed", "running")


def unsupported(q, k_codes, v_codes, *, k_spec: KVSpec, v_spec: KVSpec) -> str | None:
    """Why this kernel cannot run these inputs, or None."""
    d = q.shape[-1]
    for name, spec in (("keys", k_spec), ("values", v_spec)):
        if spec.quantized and spec.mode not in ("int", "int_block"):
            return f"{name}: mode {spec.mode!r}; this kernel reads integer codes only"
        if not spec.quantized or spec.bits not in (2, 4, 8):
            return f"{name}: {spec.bits}-bit; this kernel reads 2-, 4- and 8-bit codes only"
        if spec.axis != "token" or spec.group_size != d:
            return f"{name}: axis={spec.axis}, group_size={spec.group_size}; needs per-token groups of head_dim {d}"
    if q.shape[2] != 1:
        return f"{q.shape[2]} query tokens; this kernel is for decode (one)"
    if d not in (64, 128):
        return f"head_dim {d}; needs 64 or 128"
    group = q.shape[1] // k_codes.shape[0]
    if group > GROUP:
        return f"GQA group {group}; needs at most {GROUP}"
    page = _page_size(k_spec, k_codes, d)
    if page not in PAGES:
        return f"page size {page}; needs one of {PAGES}"
    blocked = [n for n, spec in (("keys", k_spec), ("values", v_spec)) if spec.mode == "int_block"]
    if blocked and page not in BLOCK_PAGES:
        return (
            f"{' and '.join(blocked)} in mode 'int_block' at pages of {page}; this kernel reads them at {BLOCK_PAGES}"
        )
    capability = gpu_capability()
    if blocked and capability is not None and not capability.startswith("9."):
        return f"mode 'int_block' is read by the Mosaic GPU kernel on Hopper (compute capability 9.x), not {capability}"
    return None


def gpu_capability() -> str | None:
    """The default device's compute capability ("9.0" on Hopper), or None off a GPU."""
    device = jax.devices()[0]
    return str(getattr(device, "compute_capability", "")) if device.platform == "gpu" else None


def block_attention_kernel(k_spec: KVSpec, v_spec: KVSpec):
    """The GPU kernel mode `int_block` offers (`Mode.attention_kernel`): this one, for any pair; `unsupported` says
    what it cannot read (another layout, page size or GPU), and the dispatcher's "auto" then runs the reference.
    Until 2026-12-07 it was offered only under an environment variable, as it had not yet run compiled; that day the
    compiled tests (`KVTUNER_TEST_COMPILED=1 pytest tests/test_int_block.py`, 31) passed on an H100."""
    del k_spec, v_spec
    return paged_attention


BLOCK_PAGES = (64,)  # page sizes at which the kernel reads mode `int_block`'s blocks (one tile a page)


def _page_size(spec: KVSpec, codes, head_dim: int) -> int:
    from pallas_kernels import layout

    return layout.page_size_of(spec, codes, head_dim)


def block_rows(spec: KVSpec, codes, head_dim: int) -> tuple[int, int]:
    """(R, params) of a store: mode `int_block`'s R rows of scales and zero-points after each page's code rows and
    the count of those row vectors (2 asymmetric, 1 symmetric); (0, 0) for the stored layout of mode `int`."""
    if spec.mode != "int_block":
        return 0, 0
    return codes.shape[2] - _page_size(spec, codes, head_dim), 1 if spec.symmetric else 2


def field_permutation(head_dim: int, bits: int, words: bool = False):
    """(perm, field): perm[i] = the head dim that operand column i holds, field[i] = which field of its code byte it
    is (dim = byte * (8 / bits) + field: codes packed LSB first along the head dim).

    Plain (`_operand`): column j*C + c is field j of byte c (C bytes a row). `words` (`_operand_words`): each thread
    holds 4 bytes of a row at once (Mosaic GPU's 8-bit MMA layout: bytes 16i + 4m + b, b < 4, for lane m of a
    quad) and needs its fields where the 16-bit MMA layout puts that lane's columns (8i' + 2m + e, e < 2): column
    8i' + 2m + e, with i' = (2i + k) * (8 / bits) + j, is field j of byte 16i + 4m + 2k + e."""
    per = 8 // bits
    col = np.arange(head_dim)
    if words:
        tile, m, e = col // 8, (col % 8) // 2, col % 2
        j, pair = tile % per, tile // per
        byte = 16 * (pair // 2) + 4 * m + 2 * (pair % 2) + e
    else:
        j, byte = col // (head_dim // per), col % (head_dim // per)
    return jnp.asarray(byte * per + j, jnp.int32), jnp.asarray(j, jnp.int32)


def _operand(codes, bits: int, f16: bool = False):
    """Code bytes [rows, C] (uint8, any layout) -> bf16 [rows, C * 8/bits]: the codes, fields side by side.

    Each field OR-ed into bf16 128.0's mantissa is 128 + code; subtracting 128 (exact in bf16) leaves the code. The
    subtraction is not folded into the zero-point: against 128 + code, the bf16 rounding of q and p would be
    amplified ~30x by the cancellation with the zero-point term (measured: 4/4 at bf16 precision 3e-2 relative
    instead of 1e-3).

    `f16`: f16 operands without shifts: f16's 10 mantissa bits hold the whole byte, so each field is masked in
    place and OR-ed into f16 1024.0, giving 1024 + code x 2^(bits j) for field j; after subtracting 1024 (exact)
    field j is its code times 2^(bits j), which the caller folds into the other operand."""
    mask = (1 << bits) - 1
    wide = codes.astype(jnp.uint16)  # Mosaic GPU does only bitwise operations on 8-bit registers
    if f16:
        fields = [
            jax.lax.bitcast_convert_type((wide & (mask << (bits * j))) | MAGIC_F16, jnp.float16)
            for j in range(8 // bits)
        ]
        return jnp.concatenate(fields, axis=1) - jnp.asarray(MAGIC_F16_VALUE, jnp.float16)
    fields = [
        jax.lax.bitcast_convert_type(((wide >> (bits * j)) & mask) | MAGIC, jnp.bfloat16) for j in range(8 // bits)
    ]
    return jnp.concatenate(fields, axis=1) - jnp.asarray(MAGIC_VALUE, jnp.bfloat16)


def _operand_words(codes, bits: int, f16: bool = False):
    """`_operand` for code bytes loaded four to a register (layout WGMMA_8BIT), columns as `field_permutation(...,
    words=True)`, in jnp (how the interpreter runs it; compiled, `_operand_words_mgpu` does the same in registers)."""
    rows, nbytes = codes.shape
    per, mask = 8 // bits, (1 << bits) - 1
    x = codes.reshape(rows, nbytes // 16, 4, 2, 2)  # byte 16i + 4m + 2k + e: (i, m, k, e)
    if f16:  # fields in place (see `_operand`)
        wide = x.astype(jnp.uint16)
        fields = [
            jax.lax.bitcast_convert_type((wide & (mask << (bits * j))) | MAGIC_F16, jnp.float16) for j in range(per)
        ]
    else:
        fields = [ta.magic_operand(x, bits, j) for j in range(per)]
    f = jnp.stack(fields, axis=-1).transpose(0, 1, 3, 5, 2, 4).reshape(rows, nbytes * per)  # (i, k, j, m, e)
    return f - jnp.asarray(MAGIC_F16_VALUE if f16 else MAGIC_VALUE, f.dtype)


def _magic_mgpu(f16: bool):
    """(pair, magic, sub) for inline Mosaic GPU unpacking: the vector<2 x bf16/f16> type, the magic exponent byte in
    all four bytes of an i32 (`prmt`'s second source), and the magic value in both lanes (subtracted after)."""
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir

    pair = ir.VectorType.get((2,), ir.F16Type.get() if f16 else ir.BF16Type.get())
    magic = mu.c(((MAGIC_F16 if f16 else MAGIC) >> 8) * 0x01010101, ir.IntegerType.get_signless(32))
    return pair, magic, mu.c(MAGIC_F16_VALUE if f16 else MAGIC_VALUE, pair)


def _field_mgpu(word, bits: int, j: int, f16: bool):
    """Field j of each of the four code bytes of the i32 `word`, masked: bf16 shifted down to the byte's low bits
    first; f16 in place (the code x 2^(bits j), a whole byte under the magic); 8-bit f16 the whole byte, no mask."""
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith

    i32, mask = ir.IntegerType.get_signless(32), (1 << bits) - 1
    if f16 and bits == 8:
        return word
    if f16:
        return arith.andi(word, mu.c((mask << (bits * j)) * 0x01010101, i32))
    shifted = arith.shrui(word, mu.c(bits * j, i32)) if j else word
    return arith.andi(shifted, mu.c(mask * 0x01010101, i32))


def _magic_pair_mgpu(field, sel, magic, sub, pair):
    """Two of `field`'s bytes, chosen by the `prmt` selector `sel`, under the magic exponent byte, less the magic:
    the two codes as one register of the 16-bit MMA operand."""
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir.dialects import arith

    return arith.subf(mu.bitcast(mu.prmt(field, magic, sel), pair), sub)


def _operand_words_mgpu(codes, bits: int, f16: bool):
    """Compiled `_operand_words`: a [64, C] code tile loaded in layout WGMMA_8BIT -> the [64, C * 8/bits] operand in
    the MMA layout. Per register of four code bytes: one mask (and one shift for bf16) per field for all four bytes, one
    `prmt` per two output elements that puts two masked bytes under the magic exponent byte, one packed subtract:
    ~1.4 instructions an element, where the element-wise form (`_operand`: bytes widened to 16 bits one by one,
    shifted, masked, re-packed) took ~3 (Nsight, H100, 2026-12-06)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir

    rows, nbytes = codes.shape
    per = 8 // bits
    dt = jnp.float16 if f16 else jnp.bfloat16

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_8BIT,),
        return_type=plgpu.ShapeDtypeStruct((rows, nbytes * per), dt, layout=plgpu.Layout.WGMMA),
    )
    def unpack(ctx, x):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        pair, magic, sub = _magic_mgpu(f16)
        regs = x.registers  # [row tiles, C / 16, 1, 1, 2 (row halves), 1, ...]: four bytes each
        shape = list(regs.shape)
        shape[1] *= 2 * per
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(regs.shape):
            word = mu.bitcast(regs[idx], i32)
            for j in range(per):
                f = _field_mgpu(word, bits, j, f16)
                for k, sel in ((0, 0x4140), (1, 0x4342)):  # bytes 2k, 2k+1 -> the low bytes of two 16-bit lanes
                    out[(idx[0], (2 * idx[1] + k) * per + j, *idx[2:])] = _magic_pair_mgpu(
                        f, mu.c(sel, i32), magic, sub, pair
                    )
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return unpack(codes)


def _load_pages_mgpu(refs, layout, transforms):
    """Loads the pages `refs` (each [P, ...] in shared memory, P < 64 rows) as one [P x len(refs), ...] array in
    `layout` (a WGMMA layout: warp w holds rows 16w to 16w + 15, all in one page). Each warp reads from its own
    page's slot: the load runs over a view of the whole tile whose base is that slot's address less the page's offset
    in the tile, so no rows are copied. The slots' swizzle is unchanged in the view: a page's bytes are a multiple of
    the swizzle's 8-row block."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith

    n, page = len(refs), refs[0].shape[0]
    shape, dtype = (page * n, *refs[0].shape[1:]), refs[0].dtype
    swizzle = next((t.swizzle for t in transforms if isinstance(t, plgpu.SwizzleTransform)), None)

    @plgpu.inline_mgpu(
        arg_types=tuple(plgpu.RefType(transforms) for _ in refs),
        return_type=plgpu.ShapeDtypeStruct(shape, dtype, layout=layout),
    )
    def load(ctx, *mems):
        del ctx
        ty = ir.MemRefType(mems[0].type)
        part = math.prod(ty.shape)  # elements a page
        view_ty = ir.MemRefType.get([ty.shape[0] * n, *ty.shape[1:]], ty.element_type, memory_space=ty.memory_space)
        i32 = ir.IntegerType.get_signless(32)
        # the warp's place in its warpgroup (`mu.warp_idx` counts the block's warps: with four programs a block the
        # others' warps would all read the last page, as a compiled test showed, H100 2026-12-06)
        warp = arith.remui(mu.warp_idx(sync=True), mu.c(4, i32))
        base = mu.memref_ptr(mems[0])
        for k in range(1, n):  # warps from 16w >= k x page on read page k (its rows k x page onwards in the view)
            ptr = mu.getelementptr(mu.memref_ptr(mems[k]), [-k * part], ty.element_type)
            first_warp = mu.c(k * page // 16, i32)
            base = arith.select(arith.cmpi(arith.CmpIPredicate.uge, warp, first_warp), ptr, base)
        view = mu.ptr_as_memref(base, view_ty)
        signed = mu.is_signed(dtype)
        if swizzle:
            return fa.FragmentedArray.load_tiled(view, swizzle, is_signed=signed, layout=layout.to_mgpu())
        return fa.FragmentedArray.load_untiled(view, layout=layout.to_mgpu(), is_signed=signed)

    return load(*refs)


# ---- V^T's operand straight into registers (`value_regs`) ----
#
# The value MMA is out^T [D, cols] += V^T [D, tokens] @ P [tokens, cols]. Its A operand in registers must be in the
# MMA's own layout (warp w holds rows 16w to 16w + 15 of each 64-row tile; lane (g, q) = (lane // 4, lane % 4) rows
# g and g + 8, tokens 2q, 2q + 1 (+ 8k)), so a thread holds D / 32 head dims of 16 tokens a tile. The rows of A may
# be any permutation of the head dims (the kernel puts out's rows back at the end), so each thread's dims lie in
# one 16-bit word of a token's code row (two of them for 8-bit codes at D = 128): `ldmatrix.trans` then hands lane
# (g, q) word g of token rows 2q and 2q + 1 in one register, exactly the two tokens of an MMA register, and one
# `x4` instruction loads 4 token groups of 8. A word is 16 / bits dims; where a warp's dims take less than the 16
# bytes of a row that one matrix spans (8 bytes: 2-bit codes at D = 128, 4-bit at 64), two warps share a column block
# and each takes its byte of every word.


def value_regs_supported(head_dim: int, bits: int, f16: bool) -> bool:
    """Whether V's operand can be loaded straight into registers: a thread's code bytes per token (D x bits / 256) a
    whole 1, 2 or 4, and f16 operands only for 8-bit codes (whose fields need no power-of-two correction)."""
    return head_dim * bits in (256, 512, 1024) and (not f16 or bits == 8)


def _vregs_thread_bytes(head_dim: int, bits: int) -> int:
    return head_dim * bits // 256


def value_rows(head_dim: int, bits: int):
    """(perm, field) for `value_regs`: operand row i holds head dim perm[i], field[i] of its code byte. Row
    64 mt + 16 w + 8 h + g (M tile mt, warp w, half h, lane group g) is the thread's element f = 2 mt + h: code byte
    f // (8 / bits) of the thread's bytes, field f % (8 / bits)."""
    per, tb = 8 // bits, _vregs_thread_bytes(head_dim, bits)
    i = np.arange(head_dim)
    mt, w, h, g = i // 64, (i % 64) // 16, (i % 16) // 8, i % 8
    f = 2 * mt + h
    t, j = f // per, f % per
    if tb == 1:  # two warps share a column block of 16 bytes, each its byte of every 16-bit word
        byte = 16 * (w // 2) + 2 * g + w % 2
    elif tb == 2:
        byte = 16 * w + 2 * g + t
    else:  # two column blocks a warp
        byte = 16 * (2 * w + t // 2) + 2 * g + t % 2
    return jnp.asarray(byte * per + j, jnp.int32), jnp.asarray(j, jnp.int32)


def _vregs_matrices(head_dim: int, bits: int, rows: int) -> list[list[tuple[int, int]]]:
    """The `ldmatrix.x4` instructions of one step: each four (token group kt, column block u) matrices."""
    tb = _vregs_thread_bytes(head_dim, bits)
    mats = [(kt, u) for kt in range(rows // 8) for u in range(2 if tb == 4 else 1)]
    return [mats[i : i + 4] for i in range(0, len(mats), 4)]


def _vregs_address(lane, warp, instr: int, *, head_dim: int, bits: int, page: int):
    """(page of the step, byte offset in that page's slot) of the row that `lane` gives `ldmatrix.x4` instruction
    `instr`: lanes 8m to 8m + 7 give matrix m's 8 token rows. lane and warp are ints, or `_I32`s in the kernel (the
    same arithmetic, one formula for both). Slots hold rows of C = D x bits / 8 bytes, swizzled over S = min(128, C)
    bytes as TMA writes them: the 16-byte chunk c of token row r at (c ^ (r S / 128 mod S / 16)) x 16."""
    tb, row_bytes = _vregs_thread_bytes(head_dim, bits), head_dim * bits // 8
    m, r = lane // 8, lane % 8
    if tb == 4:
        kt, block = 2 * instr + m // 2, 2 * warp + m % 2
    else:
        kt, block = 4 * instr + m, (warp // 2 if tb == 1 else warp)
    token = 8 * kt + r
    swz = min(128, row_bytes)
    xor = (r * swz // 128) % (swz // 16)  # token % 8 == r: the swizzle's row term depends on r alone
    return token // page, (token % page) * row_bytes + (block ^ xor) * 16


def _vregs_sources(head_dim: int, bits: int):
    """For the thread's element f (rows 2 mt + h): (position of its matrix among a token group's, byte of the
    16-bit word, field); byte None: the warp's byte, warp % 2 (`value_rows`, two warps a column block)."""
    per, tb = 8 // bits, _vregs_thread_bytes(head_dim, bits)
    out = []
    for f in range(head_dim // 32):
        t, j = f // per, f % per
        out.append((t // 2, t % 2, j) if tb == 4 else (0, None if tb == 1 else t, j))
    return out


def _value_operand(codes, bits: int, head_dim: int, f16: bool):
    """V^T's operand in jnp (how the interpreter runs it): code bytes [rows, C] -> [D, rows], row i the codes of
    head dim `value_rows(...)[0][i]`, as bf16 (f16) numbers. Written with reshapes, not a gather by `value_rows`'s
    permutation: a Pallas kernel may not close over an array."""
    per, mask, tb = 8 // bits, (1 << bits) - 1, _vregs_thread_bytes(head_dim, bits)
    rows, r = codes.shape[0], head_dim // 32  # r: a thread's elements f = 2 mt + h
    f = jnp.stack([(codes >> (bits * j)) & mask for j in range(per)], axis=-1)  # [rows, byte, field]
    if tb == 1:  # byte 16 (w // 2) + 2 g + w % 2, element f = field
        x = f.reshape(rows, 2, 8, 2, r // 2, 2).transpose(0, 4, 1, 3, 5, 2)  # (mt, w // 2, w % 2, h, g)
    elif tb == 2:  # byte 16 w + 2 g + t, element f = t x per + field
        x = f.reshape(rows, 4, 8, r // 2, 2).transpose(0, 3, 1, 4, 2)  # (mt, w, h, g)
    else:  # byte 16 (2 w + u) + 2 g + e, element f = 2 u + e
        x = f.reshape(rows, 4, 2, 8, 2).transpose(0, 2, 1, 4, 3)  # (u = mt, w, e = h, g)
    return x.reshape(rows, head_dim).T.astype(jnp.float16 if f16 else jnp.bfloat16)


class _I32:
    """An i32 ir.Value with the integer operators `_vregs_address` uses (powers of two for // and %)."""

    def __init__(self, v):
        self.v = v

    def _op(self, other, name: str):
        from jax.experimental.mosaic.gpu import utils as mu
        from jaxlib.mlir import ir
        from jaxlib.mlir.dialects import arith

        o = other.v if isinstance(other, _I32) else mu.c(int(other), ir.IntegerType.get_signless(32))
        return _I32(getattr(arith, name)(self.v, o))

    def __add__(self, o):
        return self._op(o, "addi")

    def __mul__(self, o):
        return self._op(o, "muli")

    def __xor__(self, o):
        return self._op(o, "xori")

    __radd__, __rmul__, __rxor__ = __add__, __mul__, __xor__

    def __floordiv__(self, o):
        assert isinstance(o, int) and o & (o - 1) == 0
        return self._op(o.bit_length() - 1, "shrui")

    def __mod__(self, o):
        assert isinstance(o, int) and o & (o - 1) == 0
        return self._op(o - 1, "andi")


def _value_operand_mgpu(refs, bits: int, head_dim: int, f16: bool, transforms, page: int | None = None):
    """Compiled V^T operand, [D, rows] in the MMA layout, from the step's code page slots `refs` (each [P, C] in
    shared memory, swizzled by `transforms`, or a plain slot whose first `page` rows hold a page's code rows stored
    swizzled: mode `int_block`'s; the step's P x len(refs) tokens in order): per `ldmatrix.x4.trans` four
    token groups' words, then per register of two tokens' words: per field one shift and one mask (bf16), one `prmt`
    per output register putting the two tokens' code bytes under the magic exponent byte, one packed subtract."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, nvvm

    page = page or refs[0].shape[0]
    rows = page * len(refs)
    tb = _vregs_thread_bytes(head_dim, bits)
    dt = jnp.float16 if f16 else jnp.bfloat16
    instrs = _vregs_matrices(head_dim, bits, rows)
    sources = _vregs_sources(head_dim, bits)

    @plgpu.inline_mgpu(
        arg_types=tuple(plgpu.RefType(transforms) for _ in refs),
        return_type=plgpu.ShapeDtypeStruct((head_dim, rows), dt, layout=plgpu.Layout.WGMMA),
    )
    def build(ctx, *mems):
        del ctx
        i32, i8 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(8)
        pair, magic, sub = _magic_mgpu(f16)
        tid = mu.thread_idx()
        lane = _I32(arith.remui(tid, mu.c(32, i32)))
        warp = _I32(arith.remui(mu.warp_idx(sync=True), mu.c(4, i32)))  # its place in its warpgroup
        bases = [mu.memref_ptr(mem) for mem in mems]
        regs = {}  # (kt, u) -> the i32 register of that matrix
        for n, mats in enumerate(instrs):
            which, off = _vregs_address(lane, warp, n, head_dim=head_dim, bits=bits, page=page)
            pages = sorted({8 * kt // page for kt, _ in mats})
            ptr = mu.getelementptr(bases[pages[0]], [off.v], i8)
            for p in pages[1:]:
                there = mu.getelementptr(bases[p], [off.v], i8)
                ptr = llvm.select(arith.cmpi(arith.CmpIPredicate.eq, which.v, mu.c(p, i32)), there, ptr)
            res = nvvm.ldmatrix(
                ptr,
                layout=nvvm.MMALayout.col,
                num=len(mats),
                shape=ir.Attribute.parse("#nvvm.ld_st_matrix_shape<m=8, n=8>"),
                elt_type=nvvm.LdStMatrixEltType.B16,
            )
            for k, mat in enumerate(mats):
                regs[mat] = llvm.extractvalue(i32, res, [k]) if len(mats) > 1 else res
        if tb == 1:  # the warp's byte of each word, bytes s and 2 + s of the register: a selector per thread
            sel_dyn = arith.addi(mu.c(0x4240, i32), arith.muli((warp % 2).v, mu.c(0x0101, i32)))
        fields = {}
        shape = fa.WGMMA_LAYOUT.registers_shape((head_dim, rows))
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            mt, kt, h = idx[0], idx[1], idx[4]
            u, e, j = sources[2 * mt + h]
            key = (kt, u, j)
            if key not in fields:  # f16 only for 8-bit codes (`value_regs_supported`): the whole byte
                fields[key] = _field_mgpu(regs[(kt, u)], bits, j, f16)
            sel = sel_dyn if e is None else mu.c(0x4240 + 0x0101 * e, i32)
            out[idx] = _magic_pair_mgpu(fields[key], sel, magic, sub, pair)  # bytes e, 2 + e: tokens 2q, 2q + 1
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return build(*refs)


def _reduce_rows_mgpu(x, scratch, op: str):
    """x [rows, n] (layout WGMMA) -> [n], its rows reduced by `op` ("add" or "max"), the step across the four warps
    through `scratch` (a warpgroup's own float32 [REDUCE_SCRATCH] in shared memory). Pallas's own reduction goes
    through one scratch region of the block, which a block's several warpgroups would share (compiled, four
    programs a block gave wrong sums with it, H100 2026-12-06; the interpreter, which needs no scratch, did not)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((x.shape[1],), x.dtype, layout=plgpu.Layout.WGMMA.reduce(0)),
    )
    def reduce(ctx, arr, mem):
        del ctx
        return arr.reduce(op, 0, scratch=mem)

    return reduce(x, scratch)


def _store_rows_mgpu(x, rows, dst):
    """x [R, n] (layout WGMMA) -> dst [c, R] (global memory, c <= n): dst[j, rows[i]] = x[i, j] for j < c, i.e. x
    transposed with its rows put in the order `rows` (layout WGMMA_ROW: each thread holds its rows' entries) names.
    Each thread stores its own elements, 4 bytes each (the kernel's 4 KB of output a program, once)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, memref, vector

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.RefType()))
    def store(ctx, arr, idx, mem):
        del ctx
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        c = ir.MemRefType(mem.type).shape[0]
        quad = arith.remui(mu.thread_idx(), mu.c(4, i32))  # lane % 4: the thread's columns 2 (lane % 4) + e
        for reg_idx in np.ndindex(arr.registers.shape):
            mt, nt, h = reg_idx[0], reg_idx[1], reg_idx[4]
            row = vector.extract(idx.registers[mt, 0, h, 0, 0], [], [0])
            for e in range(2):
                column = arith.addi(arith.muli(quad, mu.c(2, i32)), mu.c(8 * nt + e, i32))
                value = vector.extract(arr.registers[reg_idx], [], [e])
                with mu.when(arith.cmpi(arith.CmpIPredicate.ult, column, mu.c(c, i32))):
                    cast = [arith.index_cast(index, v) for v in (column, row)]
                    memref.store(value, mem, cast)

    store(x, rows, dst)


def _block_row_mgpu(ref, first: int, n: int, dtype, layout):
    """n values of `dtype` from element `first` of a page's rows slot (uint8 [R, W] in shared memory, plain), in
    `layout` (one value per token row of the tile): the slot's bytes read through a view of that dtype."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(),),
        return_type=plgpu.ShapeDtypeStruct((n,), dtype, layout=layout),
    )
    def load(ctx, mem):
        del ctx
        ty = ir.MemRefType(mem.type)
        el = ir.F16Type.get() if jnp.dtype(dtype) == jnp.float16 else ir.BF16Type.get()
        ptr = mu.getelementptr(mu.memref_ptr(mem), [first * jnp.dtype(dtype).itemsize], ir.IntegerType.get_signless(8))
        view = mu.ptr_as_memref(ptr, ir.MemRefType.get([n], el, memory_space=ty.memory_space))
        return fa.FragmentedArray.load_untiled(view, layout=layout.to_mgpu(), is_signed=None, swizzle=16)

    return load(ref)


def _block_tile_mgpu(ref, rows: int, layout):
    """The code tile [rows, W] at the start of a page's plain slot (uint8 [R', W] in shared memory; mode `int_block`
    stores its code rows swizzled over S = min(128, W) bytes), loaded in `layout` as from a tile TMA had swizzled:
    through a view of the slot tiled (8, S) (for W <= 128 the same bytes as the untiled rows)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir

    w = ref.shape[-1]
    swizzle = min(128, w)

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(),),
        return_type=plgpu.ShapeDtypeStruct((rows, w), ref.dtype, layout=layout),
    )
    def load(ctx, mem):
        del ctx
        ty = ir.MemRefType(mem.type)
        tiled = ir.MemRefType.get([rows // 8, w // swizzle, 8, swizzle], ty.element_type, memory_space=ty.memory_space)
        view = mu.ptr_as_memref(mu.memref_ptr(mem), tiled)
        return fa.FragmentedArray.load_tiled(view, swizzle, is_signed=mu.is_signed(ref.dtype), layout=layout.to_mgpu())

    return load(ref)


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
    precision: str = "high",
    num_splits: int | None = None,
    stages: int = 4,
    pages_per_step: int = 1,
    swizzle_codes: bool = True,
    softmax: str | None = None,
    key_f16: bool | None = None,
    value_f16: bool | None = None,
    approx_math: bool = False,
    auto_barriers: bool = True,
    profile_dir: str | None = None,
    table_smem: bool = True,
    word_unpack: bool = True,
    warpgroups: int = 1,
    one_score_mma: bool = True,
    value_regs: bool | None = None,
    interpret: bool = False,
):
    """Decode attention of q [B, Hq, 1, D] over per-token 2-, 4- or 8-bit pages; returns (out [B, Hq, 1, D] float32, lse
    [B, Hq, 1] base e), as `paged_attention_reference`.

    `num_splits`: programs per (sequence, KV head) along the pages, 1 to the page table's length; splits differ by
    at most one page (default: `_default_splits`, two or more waves of programs on an H100, the last one full).
    `stages`: steps in flight per program. `pages_per_step`: 1 or 2 tiles of 64 token rows per step (two share one
    chain of MMAs, waits and barriers; pages under 64 tokens: that many tiles of them).
    `swizzle_codes`: code tiles swizzled in shared memory (False: plain rows). `softmax`: "fixed" (probabilities
    against each split's first-page maximum, no rescaling, the value MMA left in flight under the next page's key
    work; a split that overflows is run again by its own program against its largest score) or "running" (the
    online softmax, a maximum across the warps per page); default "fixed" for bf16 probabilities, "running" for
    f16 ones (f16's range leaves the fixed reference ~20 bits of headroom, and real scores rise further in some
    splits: on SmolLM2 0.2-2.5% of splits at 18 bits, BENCHMARKS.md 2026-12-05: nearly every call would then run a
    redo, each as long as a whole split's pages). `key_f16`: the key
    operand and q as f16 (fields masked in place, no shifts; see `_operand`); default: for 8-bit keys only, which
    need it (bf16's 7 mantissa bits cannot hold a code byte). `value_f16`: the value operand and p as f16 (8-bit
    values need it and default to it; 2- and 4-bit fields then come out times 2^(bits x field), taken off the
    output's rows at the end of the kernel); p x a token's value scale must stay under f16's 65504: so it does with the
    online softmax (p <= 1) and f16-stored scales, the pools' default.
    `approx_math`: Mosaic GPU's approximate exp2. `auto_barriers`: Pallas's automatic barriers (a warpgroup barrier
    before every page copy and before and after every shared-memory store: 11 a page with 6 pools); False: the two a
    page needs, placed by the kernel (`_call`'s "stage"), which timed the same within the run-to-run spread (H100
    2026-12-06: 0.96-1.06x), so the automatic ones stay. `profile_dir`: write Mosaic GPU's per-warpgroup trace of the
    named regions there (`benchmarks/mgpu_trace.py` sums it). `table_smem`: read the page table from shared memory (a
    copy of the split's slice) rather than global memory. `word_unpack`: unpack codes four bytes a register
    (`_operand_words_mgpu`; False: element-wise, `_operand`). `warpgroups`: programs a block, 1 or 4 (each program one
    warpgroup with its own page slots, barriers, staging tiles and reduction scratch; a block of 4 is 512 threads, which
    ptxas must fit in 128 registers each, so that an SM holds 4 programs (one-warpgroup blocks took 133-147 registers
    and 3 fit; 4/4 at pages of 64 then needs 2 or 3 stages, for shared memory; H100 2026-12-06: 4/4 1.04x faster with 2
    stages, 2/2 and 4/2 1.4x slower, 3 stages 1.5x slower; since the group-width score tile 4/4 1.10x faster, 0.250 ms
    against 0.274-0.281, 2/2 the same, 4/2 1.08x slower). `one_score_mma` (precision "high"): q's two bf16 terms side by
    side in one score MMA of 16 columns, the halves summed after (False: two MMAs of 8 columns into one accumulator).
    `value_regs`: V^T's operand loaded straight into the value MMA's registers (`ldmatrix.trans`, `value_rows`) rather
    than built as K's and staged through shared memory: no staging stores, fence or barrier for V, 16 KB less
    shared memory a program; on an H100 at batch 32 x 16K, pages of 64 (2026-12-06): 4/4 0.265 -> 0.243 ms, 2/2
    0.247 -> 0.228, 4/2 0.249 -> 0.227, 8/8 the same. Default where `value_regs_supported` (2- and 4-bit values at
    bf16, 8-bit at f16, head_dim 64 or 128, except 2-bit at 64) at the pages compiled-checked (`VALUE_REGS_PAGES`).
    `interpret`: Mosaic GPU's interpreter on the CPU, with the key operand and V^T's staged through shared memory (the
    interpreter takes MMA operands only from there; V^T's built in jnp, `_value_operand`); compiled, they stay in
    registers."""
    validate(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, page_table, num_tokens, k_spec, v_spec)
    why = unsupported(q, k_codes, v_codes, k_spec=k_spec, v_spec=v_spec)
    if why:
        raise ValueError(f"paged_attention_mgpu: {why}")
    if precision not in KERNEL_PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {KERNEL_PRECISIONS}")
    if softmax is not None and softmax not in SOFTMAXES:
        raise ValueError(f"softmax={softmax!r}: expected one of {SOFTMAXES}")
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)  # Mosaic GPU writes its trace there but does not create it
    b, hq, _, d = q.shape
    h = k_codes.shape[0]
    group = hq // h
    max_pages = page_table.shape[1]
    # entries past a sequence's pages may be anything (-1 as the engine leaves them): clamped here, so that the kernel
    # uses an entry as soon as it is read (Nsight: the clamp after the shared-memory read held 37% of the kernel's
    # short-scoreboard stalls), their tokens masked there
    table = jnp.clip(page_table.astype(jnp.int32), 0, k_codes.shape[1] - 1)
    page = _page_size(k_spec, k_codes, d)
    # mode `int_block`: a side's scales and zero-points lie in each page's block, after its code rows (R rows)
    kblock, vblock = block_rows(k_spec, k_codes, d), block_rows(v_spec, v_codes, d)
    step_pages = max(1, TILE // page) * pages_per_step  # pages under 64 tokens share a step's MMA tile
    if warpgroups not in WARPGROUPS:
        raise ValueError(f"warpgroups={warpgroups}: expected one of {WARPGROUPS}")
    kb, vb = k_spec.bits, v_spec.bits
    key_f16 = kb == 8 if key_f16 is None else key_f16
    value_f16 = vb == 8 if value_f16 is None else value_f16
    for name, bits, f16 in (("key_f16", kb, key_f16), ("value_f16", vb, value_f16)):
        if bits == 8 and not f16:
            raise ValueError(f"{name}=False: 8-bit codes need f16 operands (a code byte does not fit bf16's mantissa)")
    can_regs = value_regs_supported(d, vb, value_f16)
    if value_regs and not can_regs:
        raise ValueError(
            f"value_regs=True: V's operand goes straight to registers for head_dim x value bits of 256, 512 or 1024 "
            f"and f16 operands only for 8-bit values; got head_dim {d}, {vb}-bit values, value_f16={value_f16}"
        )
    if value_regs is None:
        value_regs = can_regs and page in VALUE_REGS_PAGES
    pools = _slot_pools((k_codes, k_scale, k_zero, v_codes, v_scale, v_zero), page, kblock, vblock)
    per_sm = programs_per_sm(pools, page, step_pages, stages, d, warpgroups, value_regs)
    if not per_sm:
        need = program_smem(pools, page, step_pages, stages, d, value_regs) * warpgroups // 1024
        raise ValueError(
            f"warpgroups={warpgroups}, stages={stages}: a block's shared memory ({need} KB) is over an SM's "
            f"{SMEM_PER_SM // 1024 - 1} KB; use fewer stages or warpgroups"
        )
    splits = num_splits or _default_splits(b * h, max_pages, stages * step_pages, per_sm)
    if not 1 <= splits <= max_pages:
        raise ValueError(f"num_splits={splits}: expected 1 to the page table's {max_pages} pages")
    if pages_per_step not in (1, 2):
        raise ValueError(f"pages_per_step={pages_per_step}: expected 1 or 2")

    softmax = softmax or ("running" if value_f16 else "fixed")
    kperm, kfield = field_permutation(d, kb, word_unpack)
    vperm, vfield = value_rows(d, vb) if value_regs else field_permutation(d, vb, word_unpack)
    # q: [B, H, GROUP, D] in the key operand's dim order, scaled so that scores come out in base 2; the group padded
    # to GROUP columns
    qf = q[:, :, 0, :].astype(jnp.float32).reshape(b, h, group, d) * (sm_scale * LOG2E)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, GROUP - group), (0, 0)))
    qsum = jnp.sum(qf, axis=-1)  # [B, H, GROUP]: the zero-point term's weight
    qp = qf[..., kperm]
    gain = jnp.ones_like(qsum)  # scores = kscale x (raw MMA result / gain) + kzero x qsum
    if key_f16:
        # key field j comes out as code x 2^(kb j): q's column takes 2^-(kb j); then each row is scaled by a power
        # of two that puts its largest element near Q_F16_TOP (f16 range; small elements stay normal longer)
        qp = qp * jnp.exp2(-float(kb) * kfield).astype(jnp.float32)
        top = jnp.max(jnp.abs(qp), axis=(-1, -2), keepdims=True)
        e = jnp.floor(jnp.log2(Q_F16_TOP / jnp.where(top > 0, top, 1.0)))
        gain = jnp.broadcast_to(jnp.exp2(e)[..., 0], qsum.shape)
        qp = qp * jnp.exp2(e)
    # split with bit operations (`round_bf16`): XLA on GPU may drop an f32 -> bf16 -> f32 round trip; with a plain
    # cast a compiled check with bf16 queries gave 4.5e-4 at "high" (H100, 2026-12-05), with this split the compiled
    # tests meet 1e-4 (H100, 2026-12-06; BENCHMARKS.md)
    split = ta.round_f16 if key_f16 else ta.round_bf16
    q_hi, hi32 = split(qp)
    q_lo, _ = split(qp - hi32)
    if precision == "bf16":
        q_lo = jnp.zeros_like(q_lo)
    if key_f16:  # [B, H, 2, GROUP]: qsum and 1 / gain
        qaux = jnp.stack([qsum, 1.0 / gain], axis=2)
    else:  # the same (gain 1) as one reduction, which XLA runs as one launch (sum and stack were two): D x 1/D is 1
        qaux = jnp.sum(jnp.stack([qf, jnp.full_like(qf, 1.0 / d)], axis=2), axis=-1)

    def rows(x):  # per-token scale/zero [H, N, P, 1] -> [H, N, P], the same bytes (no copy of the pool)
        return None if x is None else x.reshape(x.shape[:3])

    call = functools.partial(
        _call,
        jnp.concatenate([q_hi, q_lo], axis=2),  # [B, H, 2 * GROUP, D]: both terms in one copy
        qaux,
        k_codes,
        None if kblock[0] else rows(k_scale),  # a block's rows come with its codes, one copy a page
        rows(k_zero),
        v_codes,
        None if vblock[0] else rows(v_scale),
        rows(v_zero),
        _split_table(table, splits) if table_smem else table,
        num_tokens.astype(jnp.int32),
        vperm.astype(jnp.int32),
        # f16 value field j comes out as code x 2^(vb j) (exact powers of two), taken off its rows in the kernel
        jnp.exp2(-float(vb) * vfield).astype(jnp.float32) if value_f16 and vb < 8 else None,
        group=group,
        # p bf16 (float32's range) and the values' scales and zero-points f16 (at most 65504): every p-weighted sum
        # is then bounded by the sum of p, and the overflow check reads l alone
        bounded=not value_f16
        and (
            v_spec.scale_dtype == "float16"
            if vblock[0]
            else all(x is None or x.dtype == jnp.float16 for x in (v_scale, v_zero))
        ),
        kb=kb,
        vb=vb,
        splits=splits,
        stages=stages,
        pps=pages_per_step,
        swizzle_codes=swizzle_codes,
        key_f16=key_f16,
        value_f16=value_f16,
        two_terms=precision == "high",
        one_score_mma=one_score_mma,
        value_regs=value_regs,
        approx_math=approx_math,
        auto_barriers=auto_barriers,
        profile_dir=profile_dir,
        table_smem=table_smem,
        word_unpack=word_unpack,
        table_pages=max_pages,
        wgs=warpgroups,
        kblock=kblock,
        vblock=vblock,
        scale_dtypes=(k_spec.scale_dtype, v_spec.scale_dtype),
        interpret=interpret,
    )
    if interpret:  # one interpreted kernel at a time (`_settled`)
        call = functools.partial(lambda c, **kw: _settled(c(**kw)), call)
    # the splits that overflow against their fixed reference (a score ~127 above it in base 2, or sums of p from
    # ta.FIXED_L_LIMIT; never seen on real scores) are redone by their own program, against the split's largest score
    # (each thread keeps the largest of its own): no second kernel, flag or select on the step's path
    o, m, l, _ = call(fixed=softmax == "fixed")
    # o: [B, H, S, group, D]; m (-inf where a split saw no token), l: [B, H, S, GROUP]
    # [B, H, group, D], [B, H, group]
    out, lse = ta.combine_splits(o, m[..., :group], l[..., :group], split_by_split=splits <= UNROLL_COMBINE)
    return out.reshape(b, hq, 1, d), lse.reshape(b, hq, 1)


UNROLL_COMBINE = 16  # splits up to this many are combined split by split (`ta.combine_splits`)


def _settled(res):
    """`res` once computed, where it is concrete (eager calls; under a trace it is returned as is). Mosaic GPU's
    interpreter runs each kernel's barriers and copies as host callbacks that dispatch JAX ops of their own; with a
    second interpreted kernel or eager ops dispatched behind it, the CPU client's threads can all end up waiting on
    one another: on 2 cores, two processes each calling this kernel eagerly hung within seconds (2026-12-06), where
    one kernel at a time never did."""
    leaves = [x for x in jax.tree.leaves(res) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)]
    jax.block_until_ready(leaves)
    return res


TABLE_BOX = 256  # TMA copies at most this many elements along each dimension
TABLE_COLS = 64  # a split's page-table slice longer than TABLE_BOX is copied as rows of this many


def split_bounds(pages: int, splits: int, split):
    """Split `split` of `splits` covers pages [start, end) of a page table of `pages`: sizes differ by at most one."""
    return split * pages // splits, (split + 1) * pages // splits


def _split_table(table, splits: int):
    """[B, pages] -> [B, splits, rows, cols]: each split's slice of the page table (`split_bounds`) as one TMA box
    (at most TABLE_BOX each way, and a multiple of 128 bytes: what Mosaic GPU copies). Entries past a split's own
    pages repeat its last one or the next split's; the kernel masks their tokens."""
    b, pages = table.shape
    per = -(-pages // splits)  # the longest split
    cols = -(-per // 32) * 32 if per <= TABLE_BOX else TABLE_COLS
    unit = 32 // math.gcd(cols, 32)  # rows x cols a multiple of 32 entries (128 bytes)
    rows = math.ceil(math.ceil(per / cols) / unit) * unit
    start = jnp.asarray([split_bounds(pages, splits, s)[0] for s in range(splits)], jnp.int32)
    idx = jnp.minimum(start[:, None] + jnp.arange(rows * cols, dtype=jnp.int32)[None], pages - 1)
    return table[:, idx].reshape(b, splits, rows, cols)


SMS = 132  # streaming multiprocessors of an H100 or H200
SMEM_PER_SM = 228 * 1024  # shared memory of a Hopper SM (1 KB of it reserved per block)
# one-warpgroup blocks an SM holds by registers, as the default splits count them: 3 at 133-147 registers a thread
# (ptxas, Nsight, H100); since the score tile has the group's width ptxas takes 104-117, so the GPU holds 4 where
# shared memory allows (2/2, 4/2), but splits chosen for 4 have not been timed; with V's operand in registers
# (`value_regs`) 141-161 again: 3 (147 with the redo in the same kernel, 2026-12-07)
MAX_PER_SM = 3
# programs a block: 4 warpgroups (512 threads) hold ptxas to 128 registers a thread, 4 an SM (5, tried while its
# reductions were still wrong: 96 registers, spills, 1.3x slower; H100 2026-12-06)
WARPGROUPS = (1, 4)
# page sizes where V's operand goes to registers by default (`value_regs`): those compiled-checked (H100, 2026-12-06:
# pages of 16, 32 and 64 against the reference; pages of 128, two tiles a page, 2026-12-07). Timed at 64 (equal or
# faster for every pair), not at 128
VALUE_REGS_PAGES = (16, 32, 64, 128)
REDUCE_SCRATCH = 512  # float32 a warpgroup for its reductions across warps: two registers' worth at once


def _slot_pools(pools, page: int, kblock, vblock):
    """The six pools as `program_smem` counts their page slots: a mode `int_block` side as its page slot of
    `block_slot_rows` rows (shaped so that a page's slot is counted as those bytes)."""
    out = list(pools)
    for i, (rows, _) in ((0, kblock), (3, vblock)):
        if rows:
            x = pools[i]
            h, n, _, w = x.shape
            out[i] = jax.ShapeDtypeStruct((h, n, page, block_slot_rows(page + rows, w) * w // page), x.dtype)
    return tuple(out)


SLOT_ALIGN = 1024  # bytes: a block's page slots start where a 128-byte swizzle's pattern starts (it repeats each 1 KB)


def block_slot_rows(rows: int, w: int) -> int:
    """Rows of W bytes of one page slot of mode `int_block`'s blocks: the block's rows, padded so that consecutive
    slots stay SLOT_ALIGN-aligned (the code tile is read as swizzled, and a swizzle's XOR follows address bits)."""
    per = SLOT_ALIGN // math.gcd(SLOT_ALIGN, w)  # rows a whole number of SLOT_ALIGN bytes
    return -(-rows // per) * per


def program_smem(pools, page: int, step_pages: int, stages: int, head_dim: int, value_regs: bool = False) -> int:
    """Shared memory of one program: each step's page slots x `stages`, the q, V and p staging (V's not with
    `value_regs`), the table slice."""
    per_step = 0
    for x in pools:
        if x is not None:
            row = math.prod(x.shape[3:]) * x.dtype.itemsize if x.ndim == 4 else x.dtype.itemsize
            per_step += max(page * row, 128) * step_pages  # scale rows under 128 bytes are copied 128 wide
    rows = max(page, TILE) * (step_pages // max(1, TILE // page))
    staged = COLS if value_regs else head_dim + COLS
    return stages * per_step + 2 * GROUP * head_dim * 2 + rows * staged * 2 + 1024 + REDUCE_SCRATCH * 4


def programs_per_sm(
    pools, page: int, step_pages: int, stages: int, head_dim: int, warpgroups: int = 1, value_regs: bool = False
) -> int:
    """Programs of this kernel an SM holds at once, by shared memory (`program_smem`) and by registers: blocks of one
    warpgroup, 3 an SM (MAX_PER_SM); a block of 4 warpgroups (`warpgroups=4`) is 512 threads, which ptxas must fit in
    128 registers each: one block, 4 programs an SM. 4/4 pages of 64: ~59 KB a program, 3 an SM (4 stages), or 4 in
    one block (2 or 3 stages); 8/8: ~91 KB, 2. 0 where one block does not fit."""
    block = program_smem(pools, page, step_pages, stages, head_dim, value_regs) * warpgroups + 1024
    by_regs = MAX_PER_SM if warpgroups == 1 else 1
    return warpgroups * min(by_regs, SMEM_PER_SM // block)


def _default_splits(programs: int, max_pages: int, min_pages: int, per_sm: int = MAX_PER_SM) -> int:
    """Splits for `programs` (sequence, KV head) pairs: at least two waves of the `per_sm` x SMS programs that run at
    once, each split at least `min_pages` pages (the pipeline's steps in flight) where possible; of the counts from
    that to twice it, the one whose last wave is fullest (fewest splits on a tie). Measured at batch 32 x 16K (H100,
    2026-12-06): 4/4 at pages of 64 (3 an SM): 1 split 0.480 ms, 2 0.445, 3, 4 or 6 0.430, 8 0.437; 8/8 at pages of
    32 (2 an SM), batch 48: 3 splits (4.4 waves) 0.824 ms, 2 (2.9) 0.753, 6 0.765, 8 0.740, 12 0.762."""
    slots = per_sm * SMS
    cap = max(1, min(max_pages // min_pages, max_pages))
    first = max(1, min(-(-2 * slots // programs), cap))

    def waste(s):  # idle program slots of the last wave, as a fraction of all
        n = programs * s
        return -(-n // slots) * slots / n

    return min(range(first, min(2 * first, cap) + 1), key=lambda s: (round(waste(s), 3), s))


POOL_NAMES = ("kc", "ks", "kz", "vc", "vs", "vz")  # key codes, scales, zero-points; the same for values

STATIC = (
    "kb", "vb", "splits", "stages", "pps", "swizzle_codes", "key_f16", "value_f16", "two_terms", "one_score_mma",
    "value_regs", "fixed", "approx_math", "auto_barriers", "profile_dir", "table_smem", "word_unpack", "table_pages",
    "wgs", "interpret", "group", "bounded", "kblock", "vblock", "scale_dtypes",
)  # fmt: skip


@functools.partial(jax.jit, static_argnames=STATIC)
def _call(
    q2,
    qaux,
    kc,
    ks,
    kz,
    vc,
    vs,
    vz,
    table,
    lengths,
    vrows,
    vrow_scale=None,
    *,
    group,
    bounded,
    kb,
    vb,
    splits,
    stages,
    pps,
    swizzle_codes,
    key_f16,
    value_f16,
    two_terms,
    one_score_mma,
    value_regs,
    fixed,
    approx_math,
    auto_barriers,
    profile_dir,
    table_smem,
    word_unpack,
    table_pages,
    wgs,
    interpret,
    kblock=(0, 0),
    vblock=(0, 0),
    scale_dtypes=("float16", "float16"),
):
    """kc/vc: code pools [H, N, P, D*b/8] uint8; ks/vs: scales [H, N, P]; kz/vz: zero-points [H, N, P], or None
    (symmetric). kblock/vblock: `block_rows` of each side; where R > 0 that side is mode `int_block`'s blocks
    [H, N, P + R, W], passed as its codes (its scales and zero-points None): each page is copied whole, plain, into a
    slot of `block_slot_rows` rows, its code tile read through a swizzled view and its scales and zero-points from
    the rows after it (as `scale_dtypes`). table: [B, pages], or with `table_smem` [B, splits, rows, cols]
    (`_split_table`). vrows: int32 [D],
    the head dim of each row of V's operand (out's rows come out in that order and are put back in the kernel);
    vrow_scale: None, or float32 [D], a factor per operand row (f16 value fields' powers of two).

    Returns (o [B, H, splits, group, D], m, l, redone [B, H, splits, GROUP]): each split's unnormalized output
    (zero-point term included, dims in order), its softmax reference (base 2; -inf where it saw no token) and sum of
    p, and 1 in the columns whose fixed pass overflowed (`fixed`: that split was then redone in the same program)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, h, qcols, d = q2.shape
    qcols //= 2  # the score MMA's columns: the GQA group (padded), each query head once
    cols = 2 * qcols  # the value MMA's: p's two terms side by side
    fused = two_terms and one_score_mma  # the score MMA: q's two terms side by side, 2 x qcols columns
    terms = 2 if two_terms else 1  # q's bf16 terms
    page = kc.shape[2] - kblock[0]
    pstep = max(1, TILE // page) * pps  # pages a step: pages under 64 tokens share one MMA tile
    rows_ = page * pstep  # token rows a step
    per_split = -(-table_pages // splits)  # the longest split
    tcols, tsize = table.shape[-1], math.prod(table.shape[2:])

    def copyable(x):  # a page's scale row under 128 bytes (pages under 64 tokens), which TMA copies refuse: the pool
        # as one row per head, copied 128 bytes from the page's first scale (the rest belongs to other pages, unused)
        if x is None or x.ndim != 3 or page * x.dtype.itemsize % 128 == 0:
            return x
        return x.reshape(x.shape[0], -1)

    # the pools present (symmetric specs have no zero-points), by name: kernel inputs and page-slot scratch alike
    named = {n: copyable(x) for n, x in zip(POOL_NAMES, (kc, ks, kz, vc, vs, vz), strict=True) if x is not None}
    pools, names = list(named.values()), list(named)
    blocks = {f"{side}c": blk for side, blk in (("k", kblock), ("v", vblock)) if blk[0]}  # one copy a page each
    units = b * h * splits  # programs: one a (sequence, KV head, split)
    tile = plgpu.Layout.WGMMA
    row = tile.reduce(1)  # one value per token row of a [64, n] tile
    col = tile.reduce(0)  # one value per column

    def swizzled(row_bytes: int, item_bytes: int = 2):
        """Tiling and swizzle of a [rows, n] tile in shared memory (rows of 16 bytes stay plain)."""
        s = min(128, row_bytes)
        if s < 32:
            return ()
        return (plgpu.TilingTransform((8, s // item_bytes)), plgpu.SwizzleTransform(s))

    def code_transforms(row_bytes: int):
        return swizzled(row_bytes, 1) if swizzle_codes else ()

    def kernel(q_ref, qs_ref, *refs, **scr):
        # warpgroup `wg` of block `block` is program u: split fastest, then KV head, then sequence
        wg = jax.lax.axis_index("wg") if wgs > 1 else 0
        u = jax.lax.axis_index("block") * wgs + wg
        # (bi, hi, si, wg); a spare warpgroup of the last block (u past the programs) runs nothing
        at = (jnp.minimum(u // (splits * h), b - 1), (u // splits) % h, u % splits, wg)
        run = u < units if units % wgs else None  # the last block's spare warpgroups
        if run is None:
            return program(at, q_ref, qs_ref, *refs, **scr)
        pl.when(run)(lambda: program(at, q_ref, qs_ref, *refs, **scr))

    def program(at, q_ref, qs_ref, *refs, **scr):
        ins, rest = refs[: len(pools)], refs[len(pools) :]
        tab_ref, len_ref, vrows_ref = rest[:3]
        vrow_scale_ref = rest[3] if vrow_scale is not None else None
        o_ref, m_ref, l_ref, redone_ref = rest[-4:]
        bi, hi, si, wg = at
        # each warpgroup's own scratch and barriers: its q, staging tiles, table slice and page slots
        q_smem, p_smem = scr["q_smem"].at[wg], scr["p_smem"].at[wg]
        v_stage = scr["v_stage"].at[wg] if "v_stage" in scr else None  # not with `value_regs` (compiled)
        bar, pbar = scr["bar"], scr["pbar"]
        plgpu.copy_gmem_to_smem(q_ref.at[bi, hi], q_smem, bar.at[2 * wg])
        if table_smem:  # the split's slice of the page table, so that each copy's index is a shared-memory read
            tab_smem = scr["tab_smem"].at[wg]
            plgpu.copy_gmem_to_smem(tab_ref.at[bi, si], tab_smem, bar.at[2 * wg + 1])
            plgpu.barrier_wait(bar.at[2 * wg + 1])
        plgpu.barrier_wait(bar.at[2 * wg])
        qsum_c = plgpu.load(qs_ref.at[bi, hi, 0], layout=col, optimized=False)
        # f16 keys: 1 / each row's gain (see the wrapper); bf16 keys have none, and skip the multiply
        ginv_c = plgpu.load(qs_ref.at[bi, hi, 1], layout=col, optimized=False) if key_f16 else None
        length = len_ref[bi]
        # this split's pages [first, end), those holding tokens only: the pipeline's grid is dynamic, so pages past
        # the sequence's length are never copied; tokens from `limit` on are masked (mid-page, or a second page of
        # the last step that belongs to the next split)
        first, end = split_bounds(table_pages, splits, si)
        steps = (jnp.clip(jnp.minimum(end, (length + page - 1) // page) - first, 0) + pstep - 1) // pstep
        limit = jnp.minimum(length, end * page)

        def fetch(i, slot):  # step i's pages (pstep of them) of every pool into its page slots
            for which in range(pstep):
                if table_smem:  # entries in range (clamped by the wrapper)
                    j = jnp.minimum(pstep * i + which, tsize - 1)
                    entry = tab_smem[j // tcols, j % tcols]
                else:
                    entry = tab_ref[bi, jnp.minimum(first + pstep * i + which, table_pages - 1)]
                for n, ref in zip(names, ins, strict=True):
                    dst = scr[f"{n}{which}"].at[wg, slot]
                    if ref.ndim == 2:  # a flat scale pool (`copyable`): 128 bytes from the page's first scale
                        src = ref.at[hi, pl.ds(entry * page, 128 // ref.dtype.itemsize)]
                    else:
                        src = ref.at[hi, entry]
                    if n in blocks:  # a whole block, its code rows and rows of scales, plain into its padded slot
                        dst = dst.at[pl.ds(0, ref.shape[2])]
                    plgpu.copy_gmem_to_smem(src, dst, pbar.at[wg * stages + slot])

        def load(refs, layout, transforms=()):  # the pages of one MMA tile as one array [max(page, 64), ...]
            refs = [r.at[pl.ds(0, page)] if r.ndim == 1 and r.shape[0] > page else r for r in refs]  # `copyable`
            if len(refs) == 1:
                return plgpu.load(refs[0], layout=layout)
            if interpret:
                return jnp.concatenate([plgpu.load(r, layout=layout) for r in refs], axis=0)
            return _load_pages_mgpu(refs, layout, transforms)

        def tiles_of(refs, f):  # f(pages of one tile) per tile of the step, as a list
            per = len(refs) // pps
            return [f(refs[t * per : (t + 1) * per]) for t in range(pps)]

        def stacked(parts):  # the step's tiles' arrays as one [rows_, ...]
            return parts[0] if pps == 1 else jnp.concatenate(parts, axis=0)

        def rows_of(refs, f):  # f(pages of one tile) per tile of the step, stacked into [rows_, ...]
            return stacked(tiles_of(refs, f))

        def block_tile(refs, layout):  # a block's code tile (one page a tile), its rows swizzled as stored
            (ref,) = refs
            if interpret:  # plain rows, unswizzled here
                return swizzle_rows(plgpu.load(ref.at[pl.ds(0, page)], layout=layout))
            return _block_tile_mgpu(ref, page, layout)

        def operand(refs, bits, f16=False, blocked=False):  # a tile's codes -> its MMA operand (`field_permutation`)
            tf = code_transforms(refs[0].shape[-1])
            if blocked and not word_unpack:
                return _operand(block_tile(refs, tile), bits, f16)
            if blocked:
                codes = block_tile(refs, plgpu.Layout.WGMMA_8BIT)
            elif not word_unpack:
                return _operand(load(refs, tile, tf), bits, f16)
            else:
                codes = load(refs, plgpu.Layout.WGMMA_8BIT, tf)
            return (_operand_words if interpret else _operand_words_mgpu)(codes, bits, f16)

        def value_operand(refs):  # the step's V codes -> [rows_, D] to stage, or with `value_regs` V^T [D, rows_]
            blocked = "vc" in blocks
            if not value_regs:
                return rows_of(refs, lambda rs: operand(rs, vb, value_f16, blocked))
            tf = code_transforms(refs[0].shape[-1])
            if interpret:
                tiles = rows_of(refs, lambda rs: block_tile(rs, tile) if blocked else load(rs, tile, tf))
                return _value_operand(tiles, vb, d, value_f16)
            if blocked:  # the slot's code rows are stored swizzled: the same addresses as a swizzled tile's
                return _value_operand_mgpu(refs, vb, d, value_f16, (), page=page)
            return _value_operand_mgpu(refs, vb, d, value_f16, tf)

        def reduce_rows(x, op):  # [rows_, qcols] -> [qcols]; several programs a block: each through its own scratch
            if wgs == 1 or interpret:
                return x.sum(axis=0) if op == "add" else x.max(axis=0)
            return _reduce_rows_mgpu(x, scr["red"].at[wg], op)

        def colmax(x, axis, keepdims):
            assert axis == 0 and not keepdims
            return reduce_rows(x, "max")

        def bcast_row(x):
            return jax.lax.broadcast_in_dim(x, (x.shape[0], qcols), [0])

        def scale_rows(scale_s, zero_s, blk=(0, 0), dtype=None):  # the step's per-token scales and zero-points as
            # stored, one array a tile; a block's (`blk` (R, params)) read from its rows slot (scale_s), as `dtype`
            if blk[0]:  # scale_s: the step's block slots
                assert pstep == pps, "a block's rows are read one page a tile"
                return tuple(
                    [block_row(rs[0], k, dtype) for rs in tiles_of(scale_s, list)] if k < blk[1] else None
                    for k in range(2)
                )
            return tuple(
                None if refs is None else tiles_of(refs, lambda rs: load(rs, row)) for refs in (scale_s, zero_s)
            )

        def block_row(ref, k, dtype):  # vector k (0: scales, 1: zero-points) of a block slot's rows, [page] in `row`
            w_ = ref.shape[-1]
            first = page * w_ // 2 + k * page  # in 16-bit values: after the code rows
            if interpret:
                raw = plgpu.load(ref, layout=plgpu.Layout.WG_STRIDED(ref.shape, vec_size=1)).reshape(-1, 2)
                return plgpu.layout_cast(jax.lax.bitcast_convert_type(raw, dtype)[first : first + page], row)
            return _block_row_mgpu(ref, first, page, dtype, row)

        def scale_zero(stored, bits):  # `scale_rows`'s -> the per-token scales and zero terms, float32 [rows_, qcols]
            def rows(tiles):
                return stacked([bcast_row(x.astype(jnp.float32)) for x in tiles])

            scale = rows(stored[0])
            if stored[1] is None:  # symmetric: codes offset by 2^(b-1)
                return scale, scale * -(2.0 ** (bits - 1))
            return scale, rows(stored[1])

        def full(shape, lay, value=0.0, dtype=jnp.float32):  # a splat in a register layout
            return plgpu.layout_cast(jnp.full(shape, value, dtype), lay)

        def body(o_acc, known, i, slot, carry):
            # known: the reference is given (the redo pass); else the first page sets it (fixed) and each thread
            # keeps the largest of its own scores (mx, one max an element a page) for a redo's reference
            m, l_acc, z_acc, o, mx = carry
            # per pool, the step's pages' slots
            kc_s, ks_s, kz_s, vc_s, vs_s, vz_s = (
                [scr[f"{n}{w}"].at[wg, slot] for w in range(pstep)] if n in names else None for n in POOL_NAMES
            )
            with jax.named_scope("k_operand"):  # [rows_, D] bf16 (f16), dims permuted
                a = rows_of(kc_s, lambda rs: operand(rs, kb, key_f16, "kc" in blocks))
                if interpret:  # the interpreter's MMA reads operands from shared memory only
                    k_stage = scr["k_stage"].at[wg]
                    k_stage[...] = a
                    plgpu.commit_smem()
                    a = k_stage

            def scores(acc):
                with jax.named_scope("scores"):
                    # q's two terms side by side (`fused`: one MMA of 2 x qcols columns, summed below), or one MMA
                    # of qcols columns a term; each MMA is one commit group
                    q_ops = [q_smem.T] if fused else [q_smem.at[pl.ds(t * qcols, qcols)].T for t in range(terms)]
                    for q_op in q_ops:
                        plgpu.wgmma(acc, a, q_op)
                if value_regs and fixed:
                    # the previous step's value MMA, left in flight, reads V's operand from registers, which the
                    # next lines rewrite (the same registers every step): retire it first, the score MMAs stay in
                    # flight (compiled without this wait, the registers were overwritten under it: wrong outputs,
                    # H100 2026-12-06)
                    with jax.named_scope("value_wait"):
                        plgpu.wgmma_wait(len(q_ops))
                with jax.named_scope("v_operand"):  # under the score MMA
                    v_op = value_operand(vc_s)
                with jax.named_scope("scales"):  # the step's scales and zero-points read, also under the score MMA
                    sz = (
                        scale_rows(kc_s if kblock[0] else ks_s, kz_s, kblock, jnp.dtype(scale_dtypes[0])),
                        scale_rows(vc_s if vblock[0] else vs_s, vz_s, vblock, jnp.dtype(scale_dtypes[1])),
                    )
                with jax.named_scope("mma_wait"):  # also retires the previous page's value MMA (fixed)
                    plgpu.wgmma_wait(0)
                return acc[...], v_op, sz

            raw, v_op, (k_stored, v_stored) = pl.run_scoped(
                scores, plgpu.ACC((rows_, cols if fused else qcols), jnp.float32)
            )
            if fused:
                raw = raw[:, :qcols] + raw[:, qcols:]
            with jax.named_scope("softmax"):
                qsum = jax.lax.broadcast_in_dim(qsum_c, (rows_, qcols), [1])
                if key_f16:
                    raw = raw * jax.lax.broadcast_in_dim(ginv_c, (rows_, qcols), [1])
                kscale, kzero = scale_zero(k_stored, kb)
                s = kscale * raw + kzero * qsum
                tok = plgpu.broadcasted_iota(jnp.int32, (rows_, qcols), 0, layout=tile) + (first + pstep * i) * page
                s = jnp.where(tok < limit, s, -jnp.inf)
                # ref: the running maximum with -inf (nothing seen yet) as 0, so masked scores give p = 0, never NaN
                if fixed and known:  # the redo pass: the split's largest score, no maximum, no rescaling
                    m_new = ref = m
                elif fixed:  # the split's first page sets the reference; no maximum, no rescaling after it
                    m_new = ref = jax.lax.cond(i == 0, lambda: ta.running_max(m, [s], 0, colmax)[1], lambda: m)
                    mx = jnp.maximum(mx, s)
                else:
                    m_new, ref = ta.running_max(m, [s], 0, colmax)
                    alpha = jnp.exp2(m - ref)

                    def rescale(x):
                        a = jax.lax.broadcast_in_dim(alpha, (x.shape[0], qcols), [1])
                        if x.shape[1] != qcols:  # o's columns: p's two terms of each head, both rescaled alike
                            a = jnp.concatenate([a, a], axis=1)
                        return x * a

                p = jnp.exp2(s - jax.lax.broadcast_in_dim(ref, (rows_, qcols), [1]))
                vscale, vzero = scale_zero(v_stored, vb)
                l_acc = (l_acc if fixed else rescale(l_acc)) + p
                z_acc = (z_acc if fixed else rescale(z_acc)) + p * vzero
                pv = p * vscale
                p_hi = pv.astype(vdt)
                if two_terms:
                    p_lo = (pv - p_hi.astype(jnp.float32)).astype(vdt)
                else:  # in the MMA layout, as concatenate needs (a plain zeros array is a splat)
                    p_lo = full((rows_, qcols), tile, dtype=vdt)
            with jax.named_scope("stage"):
                if not auto_barriers:
                    # the staging tiles are rewritten only once every warp has passed its wait above, which retired
                    # the previous step's value MMA (their reader); the commit below then orders the step's
                    # last reads of its page slots before the slot's refill (`fetch`, after this step)
                    plgpu.commit_smem()
                p_smem[...] = jnp.concatenate([p_hi, p_lo], axis=1)  # [rows_, cols]: p's two terms side by side
                if not value_regs:
                    v_stage[...] = v_op
                elif interpret:  # the interpreter's MMA reads operands from shared memory only
                    v_stage[...] = v_op.T
                plgpu.commit_smem()
            v_a = v_op if value_regs and not interpret else v_stage.T
            if fixed:  # into the one accumulator, left in flight: the next page's wait retires it
                with jax.named_scope("values"):
                    plgpu.wgmma(o_acc, v_a, p_smem)
                return m_new, l_acc, z_acc, o, mx

            def values(acc):
                plgpu.wgmma(acc, v_a, p_smem)
                plgpu.wgmma_wait(0)
                return acc[...]

            # the page's part in a fresh accumulator, added to the rescaled sum (one f32 add per element; the
            # interpreter runs no MMA into an initialized accumulator)
            with jax.named_scope("values"):
                o = rescale(o) + pl.run_scoped(values, plgpu.ACC((d, cols), jnp.float32))
            return m_new, l_acc, z_acc, o, mx

        def pages(o_acc, ref=None):
            """One pass over the split's pages: (m, l_acc, z_acc, o, mx); `ref`: the fixed reference, given."""
            known = ref is not None
            init = (
                ref if known else full((qcols,), col, -jnp.inf),
                full((rows_, qcols), tile),
                full((rows_, qcols), tile),
                None if fixed else full((d, cols), tile),
                full((rows_, qcols), tile, -jnp.inf) if fixed and not known else None,
            )
            # the page pipeline, `stages` steps in flight: each step's slot refilled with the step `stages` on as
            # soon as its codes are in registers. Written here rather than with `plgpu.emit_pipeline`, whose slots
            # are scoped allocations, which Mosaic GPU makes only for all of a block's warpgroups at once
            for s in range(stages):
                pl.when(s < steps)(functools.partial(fetch, s, s))

            def step(i, carry):
                slot = jax.lax.rem(i, stages)
                with jax.named_scope("copy_wait"):  # the step's pages landed
                    plgpu.barrier_wait(pbar.at[wg * stages + slot])
                carry = body(o_acc, known, i, slot, carry)
                with jax.named_scope("fetch"):  # the slot refilled, `stages` steps on
                    pl.when(i + stages < steps)(lambda: fetch(i + stages, slot))
                return carry

            m, l_acc, z_acc, o, mx = jax.lax.fori_loop(0, steps, step, init)
            if fixed:
                plgpu.wgmma_wait(0)
                o = o_acc[...]
            return m, l_acc, z_acc, o, mx

        def finish(m, l_acc, z_acc, o):
            """The split's results out (`_call`'s): p's two terms' columns summed, the zero-point term added, the
            rows put back in head-dim order and transposed, m -inf where no token was seen. Returns (l, out) with
            out [D, qcols] as summed, before the rows are put back."""
            l, z = reduce_rows(l_acc, "add"), reduce_rows(z_acc, "add")
            out = o[:, :qcols] + o[:, qcols:]
            if vrow_scale_ref is not None:  # the codes' powers of two, not the zero-point term's
                out = out * jax.lax.broadcast_in_dim(
                    plgpu.load(vrow_scale_ref, layout=row, optimized=False), (d, qcols), [0]
                )
            out = out + jax.lax.broadcast_in_dim(z, (d, qcols), [1])
            with jax.named_scope("store_out"):
                if interpret:
                    o_ref[bi, hi, si] = jnp.zeros((qcols, d), jnp.float32).at[:, vrows_ref[...]].set(out.T)[:group]
                else:
                    _store_rows_mgpu(out, plgpu.load(vrows_ref, layout=row, optimized=False), o_ref.at[bi, hi, si])
            m_ref[bi, hi, si] = jnp.where(l > 0, m, -jnp.inf)
            l_ref[bi, hi, si] = l
            return l, out

        if not fixed:
            m, l_acc, z_acc, o, _ = pages(None)
            finish(m, l_acc, z_acc, o)
            redone_ref[bi, hi, si] = full((qcols,), col, dtype=jnp.int32)
            return
        m, l_acc, z_acc, o, mx = pl.run_scoped(pages, plgpu.ACC((d, cols), jnp.float32))
        l, out = finish(m, l_acc, z_acc, o)
        # the overflow check, per column: a sum of p from ta.FIXED_L_LIMIT, or NaN (where p is bf16 and the values'
        # scales f16, `bounded`, every p-weighted sum is bounded by l: |o| <= l x 65504 x 15, |z| <= l x 65504 x 8,
        # finite wherever l < 2^64); else also an inf or NaN in out (o's or z's)
        ok = l < ta.FIXED_L_LIMIT
        if not bounded:
            ok = ok & (reduce_rows(out * 0.0, "add") == 0.0)  # NaN in the columns with an inf or NaN
        flags = jnp.where(ok, 0, 1).astype(jnp.int32)
        redone_ref[bi, hi, si] = flags
        flag_smem = scr["flag_smem"].at[wg]
        flag_smem[...] = flags
        plgpu.commit_smem()
        bad = functools.reduce(jnp.bitwise_or, [flag_smem[c] for c in range(qcols)])

        @pl.when(bad != 0)
        def _redo():
            # again against the split's largest score (each column's): p <= 1, the sums bounded by the tokens'
            ref = ta.running_max(full((qcols,), col, -jnp.inf), [mx], 0, colmax)[1]
            finish(*pl.run_scoped(lambda acc: pages(acc, ref)[:4], plgpu.ACC((d, cols), jnp.float32)))

    f32 = jnp.float32
    kdt = jnp.float16 if key_f16 else jnp.bfloat16
    vdt = jnp.float16 if value_f16 else jnp.bfloat16  # the value MMA's operands: V's and p's
    out_type = (
        jax.ShapeDtypeStruct((b, h, splits, group, d), f32),
        jax.ShapeDtypeStruct((b, h, splits, qcols), f32),
        jax.ShapeDtypeStruct((b, h, splits, qcols), f32),
        jax.ShapeDtypeStruct((b, h, splits, qcols), jnp.int32),
    )
    w = (wgs,)  # every program's scratch: one of each a warpgroup

    def slot_type(n, x):  # one pool's page slots, `stages` of them
        if n in blocks:  # a whole block a page, plain, padded to keep each slot aligned
            return plgpu.SMEM((*w, stages, block_slot_rows(x.shape[2], x.shape[3]), x.shape[3]), x.dtype)
        if x.ndim == 4:
            return plgpu.SMEM((*w, stages, page, x.shape[3]), x.dtype, transforms=code_transforms(x.shape[3]))
        return plgpu.SMEM((*w, stages, page if x.ndim == 3 else 128 // x.dtype.itemsize), x.dtype)

    scratch = dict(
        q_smem=plgpu.SMEM((*w, 2 * qcols, d), kdt, transforms=swizzled(2 * d)),
        p_smem=plgpu.SMEM((*w, rows_, cols), vdt, transforms=swizzled(2 * cols)),
        bar=plgpu.Barrier(num_barriers=2 * wgs),
        # a step's page copies all arrive on its slot's barrier
        pbar=plgpu.Barrier(num_arrivals=len(pools) * pstep, num_barriers=wgs * stages),
        **{f"{n}{which}": slot_type(n, x) for which in range(pstep) for n, x in named.items()},
    )
    if fixed:  # the overflow check's flags, read back as scalars
        scratch["flag_smem"] = plgpu.SMEM((*w, qcols), jnp.int32)
    if table_smem:
        scratch["tab_smem"] = plgpu.SMEM((*w, *table.shape[2:]), jnp.int32)
    if not value_regs or interpret:  # the value MMA's operands share one swizzle: p's rows are 2 * cols bytes
        scratch["v_stage"] = plgpu.SMEM((*w, rows_, d), vdt, transforms=swizzled(2 * cols))
    if interpret:
        scratch["k_stage"] = plgpu.SMEM((*w, rows_, d), kdt, transforms=swizzled(2 * d))
    elif wgs > 1:
        scratch["red"] = plgpu.SMEM((wgs, REDUCE_SCRATCH), jnp.float32)  # `_reduce_rows_mgpu`'s
    f = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(-(-units // wgs),),
        grid_names=("block",),
        **(dict(num_threads=wgs, thread_name="wg") if wgs > 1 else {}),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane,
            approx_math=approx_math,
            unsafe_no_auto_barriers=not auto_barriers,
            # one range per named region per page (11 of them), a few more; past that the profiler overwrites
            # shared memory (with 8 a page and the two loop regions added, the process aborted, H100 2026-12-07)
            **(dict(profile_space=16 * per_split + 32, profile_dir=profile_dir) if profile_dir else {}),
        ),
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )
    return f(q2, qaux, *pools, table, lengths, vrows, *(() if vrow_scale is None else (vrow_scale,)))
