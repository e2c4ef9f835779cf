"""Mode int_block's GPU write kernel (`pallas_kernels.modes.int_block_kernels`, Triton lowering) against the
reference write (`quantize_write_reference`: mode int's quantization, `int_block.join`, a scatter): byte for byte,
into a pool of random bytes, pages of other sequences untouched, dest < 0 skipped; the dispatcher's route; lowering
for CUDA with the pool written in place.

Interpreted on CPU; KVTUNER_TEST_COMPILED=1 runs the kernel compiled on a GPU, against the reference evaluated on
the CPU (as `tests/test_quantize_write.py`). Equality is exact: the kernel computes mode int's float32 expressions
in the same order and only moves bytes, so any difference is a bug, not rounding.
"""

from __future__ import annotations

import os
import re

if os.environ.get("KVTUNER_TEST_COMPILED") == "1":
    # see tests/test_quantize_write.py: keep XLA from dropping the reference's f16 rounding of scales on a GPU
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import abstract_mesh

from kvtuner_jax import modes
from kvtuner_jax.specs import KVSpec
from pallas_kernels.modes import int_block
from pallas_kernels.modes import int_block_kernels as ibk
from pallas_kernels.quantize_write import quantize_write, quantize_write_reference

COMPILED = os.environ.get("KVTUNER_TEST_COMPILED") == "1"


def _spec(bits, group, sym=False, sdt="float16"):
    return KVSpec(bits=bits, axis="token", group_size=group, symmetric=sym, scale_dtype=sdt, mode="int_block")


# (spec, page_size, head_dim): every width, sym/asym, both scale dtypes, one group a row and several, swizzled rows
# (W of 32 bytes or more) and plain ones (2-bit, D 64: W 16), parameter rows that fill exactly and ones padded
# (8-bit pages of 8: 16 or 32 bytes in a row of 128)
CASES = [
    (_spec(4, 128), 64, 128),
    (_spec(2, 128, sym=True), 64, 128),
    (_spec(8, 128), 32, 128),
    (_spec(8, 128, sym=True, sdt="bfloat16"), 8, 128),
    (_spec(8, 128), 8, 128),
    (_spec(4, 32, sdt="bfloat16"), 16, 64),
    (_spec(2, 64), 16, 64),
    (_spec(4, 64, sym=True), 128, 64),
]


def _ids(c):
    s, p, d = c
    return f"b{s.bits}-G{s.group_size}-{'sym' if s.symmetric else 'asym'}-{s.scale_dtype}-P{p}-D{d}"


def _pages(rng, h, m, p, d):
    """Per-channel offsets and scales, so tokens differ; one constant row (the EPS floor) and one NaN (quantized as
    0)."""
    x = rng.standard_normal((h, m, p, d)) * rng.uniform(0.2, 4.0, (1, 1, 1, d)) + rng.normal(0, 2, (1, 1, 1, d))
    x[0, 0, 1, :] = 1.5
    x[-1, -1, 3, 5] = np.nan
    return jnp.asarray(x.astype(np.float32)).astype(jnp.bfloat16)


def _pool(rng, spec, h, n, p, d):
    """A pool of random bytes (as if other sequences had written everywhere)."""
    a = modes.mode_of(spec).arrays(spec, h, n, p, d, "bfloat16").codes
    return jnp.asarray(rng.integers(0, 256, size=a.shape, dtype=np.uint8))


def _reference(pool, pages, dest, spec):
    if not COMPILED:
        return quantize_write_reference(pool, None, None, pages, dest, spec=spec)[0]
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return quantize_write_reference(*jax.device_put((pool, None, None, pages, dest), cpu), spec=spec)[0]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_write_bit_exact_and_other_pages_untouched(case, rng):
    spec, p, d = case
    h, n = 2, 7
    pool = _pool(rng, spec, h, n, p, d)
    pages = _pages(rng, h, 3, p, d)
    dest = jnp.asarray([5, -1, 2], jnp.int32)
    want = _reference(pool, pages, dest, spec)
    got, s, z = ibk.quantize_write(pool, None, None, pages, dest, spec=spec, interpret=not COMPILED)
    assert s is None and z is None
    got, want, before = (np.asarray(x) for x in (got, want, pool))
    np.testing.assert_array_equal(got, want)
    others = [i for i in range(n) if i not in (5, 2)]
    np.testing.assert_array_equal(got[:, others], before[:, others])
    assert (got[:, 5] != before[:, 5]).any()  # the page was written (random bytes would survive a no-op)
    # and what it wrote reads back as the pages, within one quantization step (independent of the writer's layout)
    deq = np.asarray(int_block.MODE.dequantize_pages(jnp.asarray(got[:, [5, 2]]), None, None, spec, jnp.float32))
    x = np.asarray(pages[:, [0, 2]].astype(jnp.float32))
    x = np.where(np.isfinite(x), x, 0.0)
    g = x.reshape(h, 2, p, d // spec.group_size, spec.group_size)
    # a group's step (quant.py: absmax / (2^(b-1) - 1) symmetric, range / (2^b - 1) asymmetric): half a step of
    # rounding, plus the 16-bit scale and zero-point's own rounding (bf16: 2^-8 relative) times up to absmax
    amax = np.abs(g).max(-1, keepdims=True)
    if spec.symmetric:
        step = amax / (2 ** (spec.bits - 1) - 1)
    else:
        step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / (2**spec.bits - 1)
    err = np.abs(deq.reshape(g.shape) - g)
    assert (err <= 0.5 * step + 3 * 2.0**-8 * amax + 1e-3).all()


@pytest.mark.parametrize(
    "case,rows,warps",
    [(CASES[0], 64, 4), (CASES[1], 8, 2), (CASES[3], 4, 1), (CASES[6], 4, 4), (CASES[7], 32, 2)],
    ids=lambda x: _ids(x) if isinstance(x, tuple) else str(x),
)
def test_write_in_token_blocks_is_the_same(case, rows, warps, rng):
    """`rows` tokens a program (several programs a page, or one, as the whole-page case here; the default is 16 of
    2 warps): each block's rows land at their own swizzle and its scales and zero-points at their own bytes, and only
    the first block pads: byte for byte the reference's write."""
    spec, p, d = case
    pool = _pool(rng, spec, 2, 5, p, d)
    pages = _pages(rng, 2, 2, p, d)
    dest = jnp.asarray([3, 0], jnp.int32)
    want = np.asarray(_reference(pool, pages, dest, spec))
    got = ibk.quantize_write(
        pool, None, None, pages, dest, spec=spec, interpret=not COMPILED, rows=rows, num_warps=warps
    )
    got = np.asarray(got[0])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[:, [1, 2, 4]], np.asarray(pool)[:, [1, 2, 4]])


def test_all_dest_negative_and_empty_writes_change_nothing(rng):
    spec, p, d = CASES[0]
    pool = _pool(rng, spec, 2, 3, p, d)
    got = ibk.quantize_write(
        pool, None, None, _pages(rng, 2, 2, p, d), jnp.asarray([-1, -1], jnp.int32), spec=spec, interpret=not COMPILED
    )[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pool))
    empty = jnp.zeros((2, 0, p, d), jnp.bfloat16)
    assert ibk.quantize_write(pool, None, None, empty, jnp.zeros((0,), jnp.int32), spec=spec)[0] is pool


def test_swizzled_columns_are_swizzle_rows(rng):
    """The kernel's store addresses are `swizzle_rows`' permutation, for every row width a block can have."""
    for w in (16, 32, 64, 128, 256):
        p = 16
        x = rng.integers(0, 256, (p, w), dtype=np.uint8)
        cols = np.asarray(ibk.swizzled_columns(p, w))
        placed = np.zeros_like(x)
        placed[np.arange(p)[:, None], cols] = x
        np.testing.assert_array_equal(placed, np.asarray(int_block.swizzle_rows(jnp.asarray(x))), err_msg=str(w))


def test_refusals():
    spec = _spec(8, 128)
    pool = modes.mode_of(spec).arrays(spec, 1, 2, 24, 128, "bfloat16").codes
    pages, dest = jnp.ones((1, 1, 24, 128), jnp.bfloat16), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="powers of two.*page_size=24"):
        ibk.quantize_write(jnp.zeros(pool.shape, jnp.uint8), None, None, pages, dest, spec=spec, interpret=True)
    with pytest.raises(ValueError, match="inside the blocks"):
        ibk.quantize_write(pool, jnp.ones((1, 2, 24, 1)), None, pages, dest, spec=spec, interpret=True)


def test_dispatcher_writes_gpu_pages_with_the_kernel(rng, monkeypatch, caplog):
    """backend="gpu": this kernel writes; "tpu" (no kernel): the reference, warned once; "auto" writes pages the
    kernel cannot (24 tokens) with the reference: byte for byte the same each time."""
    import pallas_kernels.paged_attention as pa

    calls = []
    real = ibk.quantize_write

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    spy.__module__ = ibk.__name__  # the dispatcher asks the kernel's module what it cannot write
    monkeypatch.setattr(ibk, "quantize_write", spy)
    spec, p, d = CASES[0]
    pool, pages, dest = _pool(rng, spec, 2, 3, p, d), _pages(rng, 2, 1, p, d), jnp.asarray([1], jnp.int32)
    want = np.asarray(_reference(pool, pages, dest, spec))
    got = quantize_write(pool, None, None, pages, dest, spec=spec, backend="gpu", interpret=not COMPILED)[0]
    assert calls == [1]
    np.testing.assert_array_equal(np.asarray(got), want)
    monkeypatch.setattr(modes, "_WARNED", set())  # warned once a process: forget earlier tests' warnings
    with caplog.at_level("WARNING", logger="kvtuner_jax.modes"):
        got = quantize_write(pool, None, None, pages, dest, spec=spec, backend="tpu", interpret=True)[0]
    assert calls == [1] and "'int_block' has no tpu write kernel" in caplog.text
    np.testing.assert_array_equal(np.asarray(got), want)
    spec24 = _spec(8, 128)
    pool24 = _pool(rng, spec24, 1, 2, 24, 128)
    pages24 = _pages(rng, 1, 1, 24, 128)
    monkeypatch.setattr(pa, "resolve_backend", lambda b: "gpu" if b == "auto" else b)
    got = quantize_write(pool24, None, None, pages24, dest, spec=spec24, backend="auto", interpret=True)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_reference(pool24, pages24, dest, spec24)))
    assert calls == [1]


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=_ids)
def test_lowers_for_cuda_in_place(case):
    """Compiled lowering (Triton) for an abstract H100 under a jit that donates the pool: the pool is aliased to the
    output and nothing copies it."""
    spec, p, d = case
    a = modes.mode_of(spec).arrays(spec, 2, 5, p, d, "bfloat16").codes
    pool = jax.ShapeDtypeStruct(a.shape, jnp.uint8)

    def step(codes, pages, dest):
        return ibk.quantize_write(codes, None, None, pages, dest, spec=spec)[0]

    with jax.sharding.use_abstract_mesh(abstract_mesh("NVIDIA H100", "gpu")):
        text = (
            jax.jit(step, donate_argnums=(0,))
            .trace(pool, jax.ShapeDtypeStruct((2, 3, p, d), jnp.bfloat16), jax.ShapeDtypeStruct((3,), jnp.int32))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    assert "triton" in text
    assert re.findall(r"tf\.aliasing_output = (\d+)", text) == ["0"]
    assert "stablehlo.copy" not in text
