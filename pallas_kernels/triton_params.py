"""Triton compiler parameters beyond the two Pallas exposes: a cap on registers per thread.

`plgpu.CompilerParams` carries `num_warps` and `num_stages` only. How many programs of a kernel share an SM is set
by its registers per thread (65,536 per SM: 4 warps at <= 168 registers run 3 programs an SM, at <= 128 four), so
for a kernel bound by issue and latency the cap looks like a lever. For our quantized attention kernels it was not
(H100, 2026-12-05, BENCHMARKS.md: 4 programs an SM instead of 3, no faster), so it is off unless asked for.
`CompilerParams(max_registers=n)` lowers exactly as Pallas's Triton lowering does, then marks the
Triton module with `ttg.maxnreg = n`, the module attribute standalone Triton sets for its `maxnreg` option: Triton's
conversion to LLVM turns it into the kernel's `.maxnreg` directive, which ptxas obeys (spilling to local memory if
it must).

This reaches into JAX's Pallas internals (`jax._src.pallas`), pinned with jax==0.11.2; `register()` says clearly if
they moved. Under `interpret=True` the parameters are ignored, as Pallas's own are.
"""

from __future__ import annotations

import dataclasses
import functools
import io

from jax.experimental.pallas import triton as plgpu

MAXNREG_ATTR = "ttg.maxnreg"


@dataclasses.dataclass(frozen=True)
class CompilerParams(plgpu.CompilerParams):
    """`plgpu.CompilerParams` plus `max_registers` (None: the compiler's choice; else a multiple of 8 in 24..256)."""

    max_registers: int | None = None

    def __post_init__(self):
        n = self.max_registers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 24 <= n <= 256 or n % 8):
            raise ValueError(f"max_registers={n!r}: expected None or a multiple of 8 from 24 to 256 (ptxas .maxnreg)")


def compiler_params(num_warps: int, num_stages: int, max_registers: int | None) -> plgpu.CompilerParams:
    """Pallas's own parameters where there is no cap (so an uncapped kernel lowers exactly as before), else ours."""
    if max_registers is None:
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    register()
    return CompilerParams(num_warps=num_warps, num_stages=num_stages, max_registers=max_registers)


@functools.cache
def register() -> None:
    """Registers the GPU lowering of `CompilerParams` with Pallas (once)."""
    try:
        from jax._src.pallas import core as pallas_core
        from jax._src.pallas.triton import pallas_call_registration as registration

        plain = registration.pallas_call_lowering
        register_rule = pallas_core.register_lowering_rule
    except (ImportError, AttributeError) as e:  # pragma: no cover - only with another JAX than the pinned one
        raise RuntimeError(
            f"max_registers needs the Pallas Triton lowering internals of jax==0.11.2 (pyproject.toml's pin): {e}"
        ) from e

    def lower(ctx, *in_nodes, compiler_params: CompilerParams, **params):
        base = plgpu.CompilerParams(num_warps=compiler_params.num_warps, num_stages=compiler_params.num_stages)
        results = plain(ctx, *in_nodes, compiler_params=base, **params)
        if compiler_params.max_registers is not None:
            _mark(results, compiler_params.max_registers)
        return results

    register_rule(CompilerParams, lower, "gpu")


def _mark(results, max_registers: int) -> None:
    """Sets `ttg.maxnreg` on the Triton module serialized in the custom call that produced `results`."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    op = results[0].owner
    entries = {a.name: a.attr for a in op.attributes["mhlo.backend_config"]}
    with lowering._new_ir_context() as triton_context:  # the Triton dialect's own context, as the lowering makes it
        module = ir.Module.parse(ir.StringAttr(entries["ir"]).value_bytes, triton_context)
        module.operation.attributes[MAXNREG_ATTR] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), max_registers)
        buf = io.BytesIO()
        module.operation.write_bytecode(buf)
    entries["ir"] = ir.StringAttr.get(buf.getvalue(), op.context)
    op.attributes["mhlo.backend_config"] = ir.DictAttr.get(entries, op.context)
