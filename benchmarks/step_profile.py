"""Where an engine decode step's device time goes: a profile of a few steps, summed by kernel.

Builds the e2e benchmark's engine (`e2e.decode_engine`: Llama-3.1-8B shape, random bf16 weights, `--batch` sequences
with `--context` cached tokens, one manifest), runs warm-up steps, records `--steps` steps with `jax.profiler.trace`,
and sums the device events of the trace by name (read with `jax.profiler.ProfileData`; no TensorBoard needed): ms
per step of each kernel, and by group (paged attention, packed writes, matrix products, the rest), against the
step's wall time (the difference is time the device waits: host work, launches).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python3 benchmarks/step_profile.py --manifest kvtuner3.25 \\
        --batch 102 --context 16384 --precision bf16 --out /tmp/prof.json
    PYTHONPATH=. python3 benchmarks/step_profile.py --shape tiny --context 128 --batch 4 --steps 2   # CPU smoke run

On a GPU the device events are the kernels on the device planes' stream lines (not the derived "XLA Ops" lines,
which would count them twice); on a CPU (smoke runs) the ops on XLA's executor threads.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, os.path.dirname(__file__))
import e2e  # noqa: E402

from kvtuner_jax import model  # noqa: E402
from kvtuner_jax.sampling import SamplingParams  # noqa: E402
from pallas_kernels.paged_attention import PRECISIONS  # noqa: E402

GROUPS = (  # first match wins
    ("paged attention", re.compile(r"paged_attention")),
    ("packed write", re.compile(r"quantize_write")),
    ("matrix products", re.compile(r"gemm|cublas|nvjet|cutlass|sm90_xmma|matmul|dot", re.I)),
)


def group_of(name: str) -> str:
    for group, pat in GROUPS:
        if pat.search(name):
            return group
    return "other"


def device_lines(profile) -> list:
    """The lines whose events are device work: GPU stream lines, or, with no GPU plane, XLA's CPU executor threads."""
    gpu = [p for p in profile.planes if p.name.startswith("/device:GPU")]
    if gpu:
        return [ln for p in gpu for ln in p.lines if ln.name.startswith("Stream")]
    cpu = [p for p in profile.planes if p.name == "/host:CPU"]
    return [ln for p in cpu for ln in p.lines if ln.name.startswith("tf_XLA")]


def summarize(profile, steps: int) -> dict:
    """ms per step by event name and by group, and the device total, over `steps` recorded steps."""
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for line in device_lines(profile):
        for ev in line.events:
            if ev.name.startswith("ThunkExecutor"):  # CPU: the executor's wrapper around the ops it runs
                continue
            acc = per_name[ev.name]
            acc[0] += ev.duration_ns
            acc[1] += 1
    kernels = {n: {"ms": ns / 1e6 / steps, "count": c / steps} for n, (ns, c) in per_name.items()}
    groups: dict[str, float] = collections.defaultdict(float)
    for n, k in kernels.items():
        groups[group_of(n)] += k["ms"]
    return {
        "device_ms_per_step": sum(k["ms"] for k in kernels.values()),
        "groups_ms_per_step": dict(sorted(groups.items(), key=lambda x: -x[1])),
        "kernels": dict(sorted(kernels.items(), key=lambda x: -x[1]["ms"])),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama31_8b", help="llama31_8b, or tiny for CPU smoke runs")
    p.add_argument("--manifest", default="kvtuner3.25", help="16/16, K/V pairs, kvtuner3.25")
    p.add_argument("--uniform_layout", choices=["kivi", "pertoken"], default="kivi")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--page_size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="recorded decode steps")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--trace_dir", default=None, help="keep the raw trace here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON summary")
    args = p.parse_args(argv)

    cfg = e2e.model_config(args.shape)
    params = model.init_random_params(cfg, jax.random.key(0))
    m = e2e.build_manifest(args.manifest, cfg, args.uniform_layout)
    n = args.warmup + args.steps
    eng = e2e.decode_engine(
        cfg, params, m, args.batch, args.context + n + 2, args.page_size, backend=args.backend, precision=args.precision
    )
    eng.fill_random(args.batch, args.context, seed=0, sampling=SamplingParams(max_new_tokens=n + 1))
    for _ in range(args.warmup):
        eng.step()
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="step_profile_")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            outs = eng.step()  # returns once the sampled tokens are on the host
        wall = (time.perf_counter() - t0) / args.steps
    assert len(outs) == args.batch, (len(outs), args.batch)
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        print(f"error: no .xplane.pb under {trace_dir}", file=sys.stderr)
        return 2
    summary = summarize(jax.profiler.ProfileData.from_file(files[-1]), args.steps)
    summary.update(wall_ms_per_step=1e3 * wall, device=str(jax.devices()[0]), args=vars(args), trace=files[-1])
    print(f"{args.manifest} batch {args.batch} x {args.context} on {summary['device']}: wall {1e3 * wall:.2f} ms/step, "
          f"device events {summary['device_ms_per_step']:.2f} ms/step")  # fmt: skip
    for g, ms in summary["groups_ms_per_step"].items():
        print(f"  {g:<16} {ms:9.3f} ms")
    for name, k in list(summary["kernels"].items())[: args.top]:
        print(f"  {k['ms']:9.3f} ms {k['count']:6.0f}x  {name[:110]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
