"""Runs under .venv-triton (scripts/setup_triton_offline.sh), not the project's venv: compiles one TTIR file with
standalone Triton for sm_90 and writes the cubin beside it. Used by benchmarks/triton_sass.py.

    .venv-triton/bin/python benchmarks/_triton_compile.py KERNEL.ttir NUM_WARPS NUM_STAGES
"""

import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget

src, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
stem = src.rsplit(".", 1)[0]
with open(stem + ".cubin", "wb") as f:
    f.write(kernel.asm["cubin"])
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")  # ptxas, cuobjdump
print(json.dumps(dict(triton=triton.__version__, shared=kernel.metadata.shared, bin=bin_dir)))
