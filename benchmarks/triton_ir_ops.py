"""Op counts of our GPU attention kernel's Triton IR, lowered on this machine (no GPU needed) for an abstract H100 at
the Llama-3.1-8B attention shape (tests/_lowering.py): a compiler-side view of what a change removes (tensor-core
dots, inline-assembly unpackings, loads) before it can be timed. Counts are of the whole kernel module (the main
loop's body appears once; a split-wide pre-pass counts too), not of executed instructions: time it on a GPU
(benchmarks/attention.py), or compile it to SASS (benchmarks/triton_sass.py, offline; benchmarks/ncu_sass.sh on a
GPU). `--fingerprint` prints a hash of each module's text instead: equal before and after a refactor means the same
kernel.

    PYTHONPATH=. python3 benchmarks/triton_ir_ops.py --configs 8/8,4/4 \\
        --tunings '[{"precision":"bf16"},{"precision":"bf16","eight_bit":"f16"}]'
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import importlib.util
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SHOWN = ("tt.dot", "tt.elementwise_inline_asm", "tt.load", "arith.mulf", "arith.addf", "arith.select", "math.exp2")


@functools.cache
def _lowering():
    spec = importlib.util.spec_from_file_location("_lowering", ROOT / "tests" / "_lowering.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BENCH_SHAPE = dict(batch=32, pages_per_seq=256, pool_pages=8192)  # benchmarks/attention.py's batch 32 x 16K


def triton_module(k_spec, v_spec, shape: dict | None = None, **tuning) -> str:
    """Text of the Triton module (TTIR, without location info) of `paged_attention_gpu.paged_attention(**tuning)`
    for these specs, as the Pallas lowering hands it to Triton. `shape`: tests/_lowering.py's keyword arguments
    (default: its small shape, where each program has one block; BENCH_SHAPE for the benchmark's loop). Where the
    call runs two kernels (`softmax="fixed"`: the fixed-reference pass, then the rarely working redo pass), the
    first, which does the work."""
    import jax._src.pallas.triton.pallas_call_registration as registration

    modules = []
    plain = registration.lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kw):
        result = plain(*args, **kw)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = keep
    try:
        _lowering().gpu_attention_lowered(k_spec, v_spec, **(shape or {}), **tuning)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = plain
    return modules[0]


def triton_ops(k_spec, v_spec, **tuning) -> collections.Counter:
    """Op name -> count in the Triton module of `paged_attention_gpu.paged_attention(**tuning)` for these specs."""
    return collections.Counter(re.findall(r'= "?([a-z_]+\.[a-z_.0-9]+)', triton_module(k_spec, v_spec, **tuning)))


def fingerprint(k_spec, v_spec, **tuning) -> str:
    return hashlib.sha256(triton_module(k_spec, v_spec, **tuning).encode()).hexdigest()[:16]


def main(argv=None) -> None:
    import attention  # benchmarks/attention.py: the config names

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="16/16,8/8,4/4,4/2,2/2,kivi4/2")
    ap.add_argument("--tunings", default='[{"precision":"bf16"}]', help="JSON list of kernel keyword dicts")
    ap.add_argument("--fingerprint", action="store_true", help="print a hash of each module instead of op counts")
    args = ap.parse_args(argv)
    if args.fingerprint:
        for c in args.configs.split(","):
            for t in json.loads(args.tunings):
                print(f"{c} | {json.dumps(t, separators=(',', ':'))} | {fingerprint(*attention.spec_pair(c), **t)}")
        return
    print("config | tuning | " + " | ".join(s.split(".")[-1] for s in SHOWN) + " | all ops")
    for c in args.configs.split(","):
        for t in json.loads(args.tunings):
            ops = triton_ops(*attention.spec_pair(c), **t)
            cells = " | ".join(str(ops.get(s, 0)) for s in SHOWN)
            print(f"{c} | {json.dumps(t, separators=(',', ':'))} | {cells} | {sum(ops.values())}")


if __name__ == "__main__":
    main()
