"""The TPU kernels lower for the TPU platform: `jax.export.export(jax.jit(f), platforms=["tpu"])` runs Pallas ->
Mosaic lowering on CPU (no TPU needed), which rejects unsupported primitives, block shapes that break the (8, 128)
rule, bad index maps or scalar-prefetch use. It does not run Mosaic's own layout passes (those live in libtpu).

Lowering only, no execution. By default a representative subset (every K/V bit pair once for attention, every
(bits, axis, symmetric) once for the write, head_dim, page size and scale dtype rotating); the full matrix (the
write over both scale dtypes) is @pytest.mark.slow.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest
from _lowering import abstract_mesh

from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout, paged_attention_tpu, quantize_write_tpu

BITS = (2, 4, 8, 16)
HEAD_DIMS = (64, 128)
PAGE_SIZES = (16, 64, 128)
SDTS = ("float16", "bfloat16")
CHIP = "TPU v5 lite"


def _sds(a):
    return None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)


def _k_spec(bits, axis, sym, p, d, sdt="float16"):
    # Per-channel keys group over 32 tokens (KIVI) or the whole page when smaller; per-token groups over head_dim.
    group = min(32, p) if axis == "channel" else d
    return KVSpec(bits=bits, axis=axis, group_size=group, symmetric=sym, scale_dtype=sdt)


def _v_spec(bits, sym, d, sdt="float16"):
    return KVSpec(bits=bits, axis="token", group_size=min(32, d), symmetric=sym, scale_dtype=sdt)


def _export(f, *args, chip: str = CHIP):
    with jax.sharding.use_abstract_mesh(abstract_mesh(chip, "tpu")):
        exp = jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
    text = exp.mlir_module()
    assert "tpu_custom_call" in text
    return exp


def _lower_attention(kb, vb, axis, sym, d, p, sdt="float16", chip: str = CHIP, ppb: int | None = None):
    b, h, g, tq, n, mp = 4, 8, 4, 1, 64, 16
    k_spec, v_spec = _k_spec(kb, axis, sym, p, d, sdt), _v_spec(vb, not sym, d, sdt)
    k = [_sds(a) for a in layout.allocate(k_spec, h, n, p, d)]
    v = [_sds(a) for a in layout.allocate(v_spec, h, n, p, d)]

    def f(q, *args):
        return paged_attention_tpu.paged_attention(
            q, *args, k_spec=k_spec, v_spec=v_spec, sm_scale=d**-0.5, pages_per_block=ppb
        )

    q = jax.ShapeDtypeStruct((b, h * g, tq, d), jnp.bfloat16)
    _export(f, q, *k, *v, jax.ShapeDtypeStruct((b, mp), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32), chip=chip)


def _lower_write(bits, axis, sym, d, p, sdt="float16", chip: str = CHIP):
    h, n, m = 8, 64, 4
    spec = _k_spec(bits, axis, sym, p, d, sdt)
    pool = [_sds(a) for a in layout.allocate(spec, h, n, p, d)]

    def f(codes, scale, zero, pages, dest):
        return quantize_write_tpu.quantize_write(codes, scale, zero, pages, dest, spec=spec)

    pages = jax.ShapeDtypeStruct((h, m, p, d), jnp.bfloat16)
    _export(f, *pool, pages, jax.ShapeDtypeStruct((m,), jnp.int32), chip=chip)


ATTN_FULL = list(itertools.product(BITS, BITS, ("token", "channel"), (False, True), HEAD_DIMS, PAGE_SIZES))
ATTN_SUBSET = [
    (
        kb,
        vb,
        ("token", "channel")[i % 2],
        (i // 2) % 2 == 1,
        HEAD_DIMS[(i // 4) % 2],
        PAGE_SIZES[i % 3],
        SDTS[i % 5 % 2],
    )
    for i, (kb, vb) in enumerate(itertools.product(BITS, BITS))
]
WRITE_FULL = [
    c
    for c in itertools.product(BITS, ("token", "channel"), (False, True), HEAD_DIMS, PAGE_SIZES, SDTS)
    if c[0] != 16
    or (c[1] == "token" and not c[2] and c[5] == "float16")  # 16 bits: plain store, axis and symmetry do not apply
]
WRITE_SUBSET = [
    (bits, axis, sym, HEAD_DIMS[i % 2], PAGE_SIZES[i % 3], SDTS[i // 3 % 2])
    for i, (bits, axis, sym) in enumerate(itertools.product((2, 4, 8), ("token", "channel"), (False, True)))
] + [(16, "token", False, 128, 16)]


def _id(c):
    return "-".join(str(x) for x in c)


@pytest.mark.parametrize("case", ATTN_SUBSET, ids=_id)
def test_attention_lowers(case):
    _lower_attention(*case)


@pytest.mark.parametrize("case", WRITE_SUBSET, ids=_id)
def test_write_lowers(case):
    _lower_write(*case)


@pytest.mark.parametrize("chip", ["TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6 lite", "TPU7x"])
def test_lowers_for_each_generation(chip):
    _lower_attention(4, 2, "channel", False, 128, 16, chip=chip)
    _lower_write(2, "channel", False, 128, 16, chip=chip)


@pytest.mark.slow
def test_attention_lowers_full_matrix():
    # One page per step: each page of a block lowers the same code, and the subset above lowers the default block
    # size (several pages per step); this keeps the full matrix to about a minute.
    seen = set()
    for kb, vb, axis, sym, d, p in ATTN_FULL:
        key = (kb, vb, axis if kb < 16 else None, sym, d, p)  # a 16-bit K has no axis: skip the duplicate
        if key not in seen:
            seen.add(key)
            _lower_attention(kb, vb, axis, sym, d, p, ppb=1)


@pytest.mark.slow
def test_write_lowers_full_matrix():
    for case in WRITE_FULL:
        _lower_write(*case)
