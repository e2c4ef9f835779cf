"""`pallas_kernels.triton_params`: the register cap reaches the Triton module XLA compiles, and nothing else changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import abstract_mesh

from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.paged_attention_gpu import paged_attention
from pallas_kernels.triton_params import MAXNREG_ATTR, CompilerParams

SPEC = KVSpec(bits=4, axis="token", group_size=64, symmetric=False)


def _triton_modules(**kw) -> list:
    """The Triton modules (parsed) of `paged_attention(**kw)` lowered for an abstract H100, in call order."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    arrays = layout.arrays(SPEC, 8, 32, 16, 64)
    pool = [jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) for x in (arrays.codes, arrays.scale, arrays.zero)]
    q = jax.ShapeDtypeStruct((2, 32, 1, 64), jnp.bfloat16)
    pt, nt = jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)

    def f(q, k0, k1, k2, v0, v1, v2, pt, nt):
        return paged_attention(q, k0, k1, k2, v0, v1, v2, pt, nt, k_spec=SPEC, v_spec=SPEC, sm_scale=0.125, **kw)

    with jax.sharding.use_abstract_mesh(abstract_mesh("NVIDIA H100", "gpu")):
        stablehlo = jax.jit(f).trace(q, *pool, *pool, pt, nt).lower(lowering_platforms=("cuda",)).compiler_ir()
    configs = []

    def visit(op):
        if "call_target_name" in op.attributes and "triton" in ir.StringAttr(op.attributes["call_target_name"]).value:
            configs.append({a.name: a.attr for a in op.attributes["mhlo.backend_config"]})
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    visit(inner.operation)

    visit(stablehlo.operation)
    modules = []
    for config in configs:
        with lowering._new_ir_context() as ctx:
            module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes, ctx)
            attrs = module.operation.attributes
            cap = ir.IntegerAttr(attrs[MAXNREG_ATTR]).value if MAXNREG_ATTR in attrs else None
            if cap is not None:
                del attrs[MAXNREG_ATTR]
            modules.append(
                (cap, module.operation.get_asm(enable_debug_info=False), ir.IntegerAttr(config["num_warps"]).value)
            )
    return modules


def test_register_cap_marks_every_triton_module_and_changes_nothing_else():
    """`max_registers=n` sets `ttg.maxnreg = n` (which Triton turns into the kernel's `.maxnreg`) on each Triton module
    the call lowers to (the fixed-softmax kernel and its redo kernel), and the modules are otherwise the uncapped ones,
    num_warps included; uncapped modules carry no cap."""
    plain = _triton_modules()
    capped = _triton_modules(max_registers=128, num_warps=4)
    assert len(plain) == len(capped) == 2
    assert [c for c, _, _ in plain] == [None, None]
    assert [c for c, _, _ in capped] == [128, 128]
    assert [(t, w) for _, t, w in capped] == [(t, w) for _, t, w in plain]


@pytest.mark.parametrize("bad", [100, 0, 16, 264, True, 128.0])
def test_register_cap_must_be_a_multiple_of_eight_ptxas_accepts(bad):
    with pytest.raises(ValueError, match="max_registers"):
        CompilerParams(num_warps=4, max_registers=bad)


def test_register_cap_is_ignored_in_interpret_mode(rng):
    """Under `interpret=True` (CI) the cap changes nothing: the kernel's result with it equals the one without, bit for
    bit, and both equal the pure-jnp reference (the oracle of the kernel tests) at their tolerance."""
    b, hq, h, d, page, npages = 2, 4, 1, 64, 16, 8
    arrays = layout.arrays(SPEC, h, npages, page, d)
    kc = rng.integers(0, 256, arrays.codes.shape, dtype=np.uint8)
    vc = rng.integers(0, 256, arrays.codes.shape, dtype=np.uint8)
    sdt = jnp.dtype(arrays.scale.dtype)
    ks, vs = (jnp.asarray(rng.uniform(0.01, 0.05, arrays.scale.shape), sdt) for _ in range(2))
    kz, vz = (jnp.asarray(rng.uniform(-0.5, 0.5, arrays.zero.shape), sdt) for _ in range(2))
    q = rng.standard_normal((b, hq, 1, d)).astype(np.float32)
    pt = np.array([[3, 1, 6, -1], [0, 2, 5, 7]], np.int32)
    nt = np.array([48, 64], np.int32)  # whole pages: the kernel's contract (paged_attention.py)
    args = [jnp.asarray(x) for x in (q, kc, ks, kz, vc, vs, vz, pt, nt)]
    kw = dict(k_spec=SPEC, v_spec=SPEC, sm_scale=d**-0.5)
    out, lse = paged_attention(*args, **kw, interpret=True)
    out_c, lse_c = paged_attention(*args, **kw, interpret=True, max_registers=128)
    np.testing.assert_array_equal(np.asarray(out_c), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(lse_c), np.asarray(lse))
    ref, _ = paged_attention_reference(*args, **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-5)
