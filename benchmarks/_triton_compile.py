"""Runs under .venv-triton (scripts/setup_triton_offline.sh), not the project's venv: compiles one TTIR file with
standalone Triton for sm_90 and writes the cubin (and the TritonGPU IR) beside it. Used by benchmarks/triton_sass.py.

    .venv-triton/bin/python benchmarks/_triton_compile.py KERNEL.ttir NUM_WARPS NUM_STAGES [MAXNREG]

`triton.compile` of an IR file starts at the stage after that file's, so it would skip the TTIR passes (canonicalize,
combine, reorder broadcasts, CSE, loop unrolling) that XLA's pipeline runs on the Pallas lowering's output (its
MakeTTIR, modelled on Triton's make_ttir). They run here first: without them, for one, a dot's result added to an
accumulator stays a separate float add instead of becoming the dot's accumulator input.
"""

import json
import os
import sys

import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend

src, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
target = GPUTarget("cuda", 90, 32)
options = dict(num_warps=warps, num_stages=stages)
if len(sys.argv) > 4:  # the kernel's `max_registers` (pallas_kernels/triton_params.py): Triton's own maxnreg option
    options["maxnreg"] = int(sys.argv[4])
backend = make_backend(target)
context = ir.context()
ir.load_dialects(context)
backend.load_dialects(context)
module = ir.parse_mlir_module(src, context)
module.context = context
module = backend.make_ttir(module, {}, backend.parse_options(options), target.arch)
stem = src.rsplit(".", 1)[0]
with open(stem + ".passes.ttir", "w") as f:
    f.write(str(module))
kernel = triton.compile(stem + ".passes.ttir", target=target, options=options)
with open(stem + ".cubin", "wb") as f:
    f.write(kernel.asm["cubin"])
with open(stem + ".ttgir", "w") as f:
    f.write(kernel.asm["ttgir"])
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")  # ptxas, cuobjdump
print(json.dumps(dict(triton=triton.__version__, shared=kernel.metadata.shared, bin=bin_dir)))
