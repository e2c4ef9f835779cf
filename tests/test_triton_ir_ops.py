"""benchmarks/triton_ir_ops.py: op counts of the GPU kernel's Triton IR, lowered on the CPU for an abstract H100.

The counts must follow what the kernel builds: per-token 8-bit codes as bf16 nibbles take two tensor-core dots per
side and block (one per 4-bit field), as whole-byte f16 operands one; the f16 option leaves 4-bit pools alone; the
16/16 kernel has one dot per side (bf16 precision, bf16 query) and no unpacking; the fixed softmax adds the scores of
a split's first block, outside the loop.
"""

from __future__ import annotations

from _bench import load_benchmark

from kvtuner_jax.specs import KVSpec

triton_ir_ops = load_benchmark("triton_ir_ops.py")


def _tok(bits: int) -> KVSpec:
    return KVSpec(bits=bits, axis="token", group_size=128)


def test_dot_counts_follow_the_kernel():
    ops = triton_ir_ops.triton_ops
    run = dict(precision="bf16", softmax="running")
    assert ops(_tok(8), _tok(8), eight_bit="nibbles", **run)["tt.dot"] == 4
    assert ops(_tok(8), _tok(8), **run)["tt.dot"] == 2  # whole-byte f16 operands (default)
    assert ops(_tok(4), _tok(4), **run) == ops(_tok(4), _tok(4), eight_bit="nibbles", **run)
    full = ops(KVSpec(bits=16), KVSpec(bits=16), **run)
    assert full["tt.dot"] == 2 and full["tt.elementwise_inline_asm"] == 3  # exp2 of alpha and of p, p rounded to bf16
    # The fixed softmax (default where probabilities are bf16): block 0's keys scored once more for the reference
    # (one dot per field), and no alpha to exponentiate
    assert ops(_tok(8), _tok(8), precision="bf16", eight_bit="nibbles")["tt.dot"] == 6
    full = ops(KVSpec(bits=16), KVSpec(bits=16), precision="bf16")
    assert full["tt.dot"] == 3 and full["tt.elementwise_inline_asm"] == 2


def test_fingerprint_tells_kernels_apart_and_ignores_locations():
    """Equal for the same kernel built twice and for a 4-bit pool whatever `eight_bit` says (the option only reaches
    8-bit sides), different where the kernel differs; no source line or location reference is left in the text."""
    fp = triton_ir_ops.fingerprint
    assert fp(_tok(4), _tok(4)) == fp(_tok(4), _tok(4), eight_bit="nibbles") == fp(_tok(4), _tok(4))
    assert fp(_tok(8), _tok(8)) != fp(_tok(8), _tok(8), eight_bit="nibbles")
    assert fp(_tok(4), _tok(4)) != fp(_tok(4), _tok(4), precision="bf16")
    text = triton_ir_ops.triton_module(_tok(4), _tok(4))
    assert "tt.dot" in text and "paged_attention_gpu.py" not in text and "#loc1" not in text


def test_joined_value_fields_make_64_row_dots():
    """2-bit values of a 128-channel head are 32 bytes a row, so each field's value dot has 32 rows, too few for a
    warpgroup MMA (64): joining two fields a dot (default under 2- and 4-bit per-token keys at both precisions,
    `_variant="novjoin"` for A/B) turns their 4 dots of 32 rows per block into 2 of 64, and the keys' dots (64 rows
    already, in the loop and in the fixed softmax's first-block scores) stay as they are. 16-bit keys keep one dot
    per field unless asked (`_variant="vjoin"`)."""
    import collections
    import re

    t2 = _tok(2)

    def dot_rows(k=t2, **kw):
        text = triton_ir_ops.triton_module(k, t2, **kw)
        return collections.Counter(re.findall(r"tt\.dot .*-> tensor<(\d+)x\d+xf32", text))

    bf16 = dict(precision="bf16")
    assert dot_rows(**bf16, _variant="novjoin") == {"64": 8, "32": 4}
    assert dot_rows(**bf16) == dot_rows(**bf16, _variant="vjoin") == {"64": 10}
    assert dot_rows(_tok(4), **bf16, _variant="novjoin") == {"64": 4, "32": 4}
    assert dot_rows(_tok(4), **bf16) == dot_rows(_tok(4), **bf16, _variant="vjoin") == {"64": 6}
    high = dot_rows(_variant="novjoin")
    assert high["32"] > 0 and high != dot_rows() == dot_rows(_variant="vjoin")
    full = KVSpec(bits=16)
    assert (
        dot_rows(full, **bf16) == dot_rows(full, **bf16, _variant="novjoin") != dot_rows(full, **bf16, _variant="vjoin")
    )
