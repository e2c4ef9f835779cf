"""The GPU kernel's PTX (`paged_attention_gpu.magic_fields` and `round_bf16_ptx` with asm) against the jnp forms it
replaces.

PTX cannot run on the CPU, so this file executes the generated assembly with a small emulator of exactly the
instructions it uses (mov, prmt in its default mode, shr, lop3, cvt.rn.bf16x2.f32), written from the PTX ISA's
definitions, on every byte value and on fresh random words (and random floats), and compares each 16-bit lane with
`tile_attention.magic_operand` (and `round_bf16`). The compiled
kernel itself is checked against the reference on a GPU (`KVTUNER_TEST_COMPILED=1 pytest
tests/test_paged_attention_gpu.py`, where "auto" means asm; BENCHMARKS.md records those runs).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _lowering import gpu_attention_lowered

from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout
from pallas_kernels import paged_attention_gpu as gpu_kernel
from pallas_kernels import tile_attention as ta
from pallas_kernels.paged_attention_gpu import CVT_BF16X2_PTX, _asm_field_ptx, _use_asm, paged_attention

M32 = np.uint64(0xFFFFFFFF)


def _prmt(a, b, sel):
    """prmt.b32 default mode: byte k of d is byte (sel nibble k & 7) of {b, a}; nibble bit 3 replicates its sign."""
    both = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    d = np.zeros_like(both)
    for k in range(4):
        nib = (sel >> (4 * k)) & 0xF
        byte = (both >> np.uint64(8 * (nib & 7))) & np.uint64(0xFF)
        if nib & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        d |= byte << np.uint64(8 * k)
    return d & M32


def _lop3(a, b, c, lut):
    """lop3.b32: each result bit is bit (4a + 2b + c) of the truth table, i.e. LUT(0xF0, 0xCC, 0xAA) bitwise."""
    out = np.zeros_like(a)
    for bit in range(8):
        if lut >> bit & 1:
            ta_, tb_, tc_ = bit >> 2 & 1, bit >> 1 & 1, bit & 1
            term = (a if ta_ else ~a & M32) & (b if tb_ else ~b & M32) & (c if tc_ else ~c & M32)
            out |= term
    return out & M32


def _run_ptx(asm: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    regs = dict(inputs)

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return np.full_like(next(iter(inputs.values())), np.uint64(int(tok, 0)))

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [x.strip() for x in rest.split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1]) & M32
        elif op == "prmt.b32":
            regs[args[0]] = _prmt(val(args[1]), val(args[2]), int(args[3], 0))
        elif op == "shr.b32":
            regs[args[0]] = (val(args[1]) >> np.uint64(int(args[2], 0))) & M32
        elif op == "cvt.rn.bf16x2.f32":  # d = (bf16(a) << 16) | bf16(b), round to nearest even (ml_dtypes)
            a, b = (np.asarray(val(x), np.uint32).view(np.float32).astype(ml_dtypes.bfloat16) for x in args[1:])
            hi, lo = (x.view(np.uint16).astype(np.uint64) for x in (a, b))
            regs[args[0]] = (hi << np.uint64(16)) | lo
        elif op == "cvt.rn.f16x2.f32":  # the same lanes in f16, round to nearest even, subnormals kept (numpy)
            a, b = (np.asarray(val(x), np.uint32).view(np.float32).astype(np.float16) for x in args[1:])
            hi, lo = (x.view(np.uint16).astype(np.uint64) for x in (a, b))
            regs[args[0]] = (hi << np.uint64(16)) | lo
        elif op in ("sub.f16x2", "fma.rn.f16x2"):  # per 16-bit lane, exact in float64, rounded once to f16
            xs = [_lanes(val(x)).view(np.float16).astype(np.float64) for x in args[1:]]
            r = xs[0] - xs[1] if op == "sub.f16x2" else xs[0] * xs[1] + xs[2]
            h = r.astype(np.float16).view(np.uint16).astype(np.uint64)
            regs[args[0]] = h[:, 0] | (h[:, 1] << np.uint64(16))
        elif op == "lop3.b32":
            regs[args[0]] = _lop3(val(args[1]), val(args[2]), val(args[3]), int(args[4], 0))
        else:
            raise AssertionError(f"emulator does not know {op!r}")
    return regs


def _lanes(words: np.ndarray) -> np.ndarray:
    """uint32 words -> their (low, high) 16-bit lanes, [n, 2]."""
    return np.stack([words & np.uint64(0xFFFF), words >> np.uint64(16)], axis=-1).astype(np.uint16)


@pytest.mark.parametrize("bits,f16", [(2, False), (4, False), (8, False), (2, True), (4, True), (8, True)])
def test_ptx_unpacking_equals_the_jnp_magic_operand(bits, f16):
    rng = np.random.default_rng()
    every = np.arange(256, dtype=np.uint8)
    # every byte value in every position, then fresh random words; [n, 4] bytes per 32-bit word, low byte first
    data = np.stack([every, np.roll(every, 1), np.roll(every, 7), every[::-1]], axis=1)
    data = np.concatenate([data, rng.integers(0, 256, (4096, 4), dtype=np.uint8)])
    word = data.astype(np.uint64) @ (np.uint64(1) << np.arange(0, 32, 8, dtype=np.uint64))
    for j in range(ta.num_fields(bits, f16)):
        asm = _asm_field_ptx(bits, j, f16)
        assert set(re.findall(r"\$\d", asm)) == {"$0", "$1", "$2"}, asm  # two 32-bit outputs, one input
        regs = _run_ptx(asm, {"$2": word})
        got = np.concatenate([_lanes(regs["$0"]), _lanes(regs["$1"])], axis=1)  # [n, 4] in byte order
        want = np.asarray(jax.lax.bitcast_convert_type(ta.magic_operand(jnp.asarray(data), bits, j, f16), jnp.uint16))
        np.testing.assert_array_equal(got, want, err_msg=f"bits={bits} field {j}")
        if f16 and bits == 8:  # and each lane is the f16 number 1024 + its byte
            np.testing.assert_array_equal(got.view(np.float16).astype(np.float32), 1024.0 + data)
        elif f16:  # 1024 + its field
            field = (data >> (j * bits)) & ((1 << bits) - 1)
            np.testing.assert_array_equal(got.view(np.float16).astype(np.float32), 1024.0 + field)


@pytest.mark.parametrize("bits,f16", [(2, False), (4, False), (2, True), (4, True)])
def test_ptx_unpacking_of_widened_codes_equals_the_jnp_magic_operand(bits, f16):
    """`_asm_field16_ptx` (`magic_fields(..., wide=True)`): two codes widened to 16-bit lanes per word in, field j of
    each out in the same lanes, on every byte value in both lanes and on fresh random pairs."""
    rng = np.random.default_rng()
    every = np.arange(256, dtype=np.uint8)
    data = np.concatenate([np.stack([every, every[::-1]], 1), np.stack([every, np.roll(every, 3)], 1)])
    data = np.concatenate([data, rng.integers(0, 256, (4096, 2), dtype=np.uint8)])  # [n, 2]: low lane, high lane
    word = data[:, 0].astype(np.uint64) | (data[:, 1].astype(np.uint64) << np.uint64(16))
    for j in range(ta.num_fields(bits, f16)):
        asm = gpu_kernel._asm_field16_ptx(bits, j, f16)
        assert set(re.findall(r"\$\d", asm)) == {"$0", "$1"}, asm  # one 32-bit output, one input
        got = _lanes(_run_ptx(asm, {"$1": word})["$0"])
        want = np.asarray(jax.lax.bitcast_convert_type(ta.magic_operand(jnp.asarray(data), bits, j, f16), jnp.uint16))
        np.testing.assert_array_equal(got, want, err_msg=f"bits={bits} field {j}")
    with pytest.raises(ValueError, match="expected 2 or 4"):
        gpu_kernel._asm_field16_ptx(8, 0)


def test_ptx_bf16_rounding_equals_round_bf16():
    """`round_bf16_ptx` (two float32 elements -> one bf16x2 word, element 0 in the low lane) rounds like the integer
    form it replaces, on fresh random floats over many magnitudes and on finite halfway cases (ties to even)."""
    rng = np.random.default_rng()
    x = (rng.standard_normal(8192) * np.exp2(rng.integers(-60, 60, 8192))).astype(np.float32)
    ties = (rng.integers(0, 2**16, 1024, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly halfway
    ties = ties[np.isfinite(ties)][:512]  # round_bf16 is for finite inputs (queries, probabilities)
    x = np.concatenate([x, ties, -ties]).reshape(-1, 2)
    bits = x.view(np.uint32).astype(np.uint64)
    regs = _run_ptx(CVT_BF16X2_PTX, {"$1": bits[:, 0], "$2": bits[:, 1]})
    got = _lanes(regs["$0"])  # [n, 2]: element 0, element 1
    hi, _ = ta.round_bf16(jnp.asarray(x))
    want = np.asarray(jax.lax.bitcast_convert_type(hi, jnp.uint16))
    np.testing.assert_array_equal(got, want)


def _halfway_f16(rng, n):
    """Finite float32 numbers exactly halfway between two neighbouring normal f16 numbers (ties to even)."""
    exp = rng.integers(113, 142, n, dtype=np.uint32)  # f16's normal exponents, biased as float32's
    mant = rng.integers(0, 2**10, n, dtype=np.uint32) << 13 | 0x1000  # 10 kept bits, then exactly one half
    return (exp << 23 | mant).view(np.float32)


def test_ptx_f16_rounding_is_round_to_nearest_even():
    """`round_f16_ptx` (`cvt.rn.f16x2.f32`, element 0 in the low lane) against numpy's float32 -> float16 (round to
    nearest even, subnormals kept), on fresh random floats over f16's range and on halfway cases."""
    rng = np.random.default_rng()
    x = (rng.standard_normal(8192) * np.exp2(rng.integers(-30, 14, 8192))).astype(np.float32)
    ties = _halfway_f16(rng, 512)
    x = np.concatenate([x, ties, -ties]).reshape(-1, 2)
    bits = x.view(np.uint32).astype(np.uint64)
    regs = _run_ptx(gpu_kernel.CVT_F16X2_PTX, {"$1": bits[:, 0], "$2": bits[:, 1]})
    np.testing.assert_array_equal(_lanes(regs["$0"]), x.astype(np.float16).view(np.uint16))


def test_round_f16_is_round_to_nearest_even_with_flush():
    """`tile_attention.round_f16` (integer ops) equals numpy's float16 rounding for inputs in f16's normal range,
    halfway cases included, flushes smaller ones to a signed zero, and returns its operand's exact float32 value."""
    rng = np.random.default_rng()
    x = (rng.standard_normal(1 << 16) * np.exp2(rng.integers(-40, 14, 1 << 16))).astype(np.float32)
    ties = _halfway_f16(rng, 4096)
    x = np.concatenate([x, ties, -ties, np.float32([0.0, -0.0, 2**-14, 65504.0, 65519.0])])
    hi, hi32 = ta.round_f16(jnp.asarray(x))
    hi, hi32 = np.asarray(hi), np.asarray(hi32)
    np.testing.assert_array_equal(hi.astype(np.float32), hi32)
    normal = np.abs(x) >= 2**-14
    np.testing.assert_array_equal(hi[normal].view(np.uint16), x[normal].astype(np.float16).view(np.uint16))
    small, h = np.abs(x[~normal]), np.abs(hi[~normal]).astype(np.float32)
    # flushed to zero, or (within half a 10-bit step of 2^-14, the step at exponent -15 being 2^-25) rounded up to it
    assert np.all((h == 0) | ((h == 2**-14) & (small >= 2**-14 - 2**-26))), small[(h != 0) & (small < 2**-14 - 2**-26)]
    assert np.array_equal(np.signbit(hi[~normal]), np.signbit(x[~normal]))
    assert (~normal).sum() > 1000 and np.isin(ties, x[normal]).all()


def _f16_words(*xs):
    """f16 arrays -> {"$1": words, "$2": ...}, two lanes per 32-bit word, element 0 in the low lane."""
    ws = [x.view(np.uint16).reshape(-1, 2).astype(np.uint64) for x in xs]
    return {f"${i + 1}": w[:, 0] | (w[:, 1] << np.uint64(16)) for i, w in enumerate(ws)}


def test_ptx_f16_dequantization_rounds_once():
    """`dequant_f16_ptx` ((operand - 1024) * scale + zero on two f16 lanes: sub.f16x2, then fma.rn.f16x2) against the
    exact value rounded once to f16, for every 8-bit code with fresh random f16 scales and zeros over a wide range.
    The jnp form interpret mode runs (float32 arithmetic, then one f16 rounding) gives the same bits where the sum is
    exact in float32: scales in [0.25, 2) and zeros on multiples of 2^-8 below 2^8 (every term a multiple of 2^-12
    below 2^10, 22 bits)."""
    rng = np.random.default_rng()
    n = 4096
    codes = np.concatenate([np.arange(256), rng.integers(0, 256, n - 256)])
    ops = (1024 + codes).astype(np.float16)
    for scale, zero, exact32 in (
        (rng.uniform(1e-3, 2.0, n), rng.normal(0, 50, n), False),
        (rng.uniform(0.25, 2.0, n), np.round(rng.normal(0, 50, n) * 256) / 256, True),
    ):
        scale, zero = scale.astype(np.float16), zero.astype(np.float16)
        want = (codes * scale.astype(np.float64) + zero.astype(np.float64)).astype(np.float16).view(np.uint16)
        regs = _run_ptx(gpu_kernel.DEQ_F16X2_PTX, _f16_words(ops, scale, zero))
        np.testing.assert_array_equal(_lanes(regs["$0"]).reshape(-1), want)
        if exact32:
            got = gpu_kernel.dequant_f16_jnp(jnp.asarray(ops), jnp.asarray(scale), jnp.asarray(zero))
            np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want)


def test_unpack_option():
    assert _use_asm("auto", interpret=False) and not _use_asm("auto", interpret=True)
    assert _use_asm("asm", interpret=False) and not _use_asm("jnp", interpret=False)
    with pytest.raises(ValueError, match="interpret"):
        _use_asm("asm", interpret=True)
    with pytest.raises(ValueError, match="unpack='fast'"):
        _use_asm("fast", interpret=False)


def test_auto_leaves_ptx_out_on_a_rocm_runtime(monkeypatch):
    monkeypatch.setattr(gpu_kernel, "_rocm_runtime", lambda: True)
    assert not _use_asm("auto", interpret=False)
    assert _use_asm("asm", interpret=False)  # asked for explicitly: the user's call


def test_asm_under_interpret_is_a_clear_error():
    q = jnp.ones((1, 2, 1, 64), jnp.float32)
    spec = KVSpec(bits=4, axis="token", group_size=64, symmetric=False, scale_dtype="float16")
    k = layout.allocate(spec, 1, 2, 16, 64)
    pt, nt = jnp.zeros((1, 1), jnp.int32), jnp.full((1,), 16, jnp.int32)
    with pytest.raises(ValueError, match="unpack='asm'"):
        paged_attention(q, *k, *k, pt, nt, k_spec=spec, v_spec=spec, sm_scale=1.0, interpret=True, unpack="asm")


@pytest.mark.parametrize("unpack, has_ptx", [("auto", True), ("asm", True), ("jnp", False)])
def test_compiled_lowering_uses_the_ptx_unpacking_by_default(unpack, has_ptx):
    """Lowered for an (abstract) H100, the default unpacking (and bf16 rounding, exp2) is the inline assembly, and
    "jnp" leaves it out."""
    spec = KVSpec(bits=4, axis="token", group_size=128, symmetric=False, scale_dtype="float16")
    text = gpu_attention_lowered(spec, spec, unpack=unpack)
    assert ("lop3.b32" in text and "prmt.b32" in text) == has_ptx
    assert ("cvt.rn.bf16x2.f32" in text and "ex2.approx.ftz.f32" in text) == has_ptx  # rounding and exp2 too
    kivi = gpu_attention_lowered(
        KVSpec(bits=4, axis="channel", group_size=32), KVSpec(bits=2, axis="token", group_size=32), unpack=unpack
    )
    assert ("fma.rn.f32" in kivi) == has_ptx  # small value groups are dequantized by fused multiply-adds
