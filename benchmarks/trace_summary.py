"""Sums a JAX profiler trace's GPU kernels by name: where a step's device time goes.

    PYTHONPATH=. python3 benchmarks/trace_summary.py TRACE_DIR [--top 15] [--steps N]

TRACE_DIR is what `jax.profiler.trace` wrote (e.g. `benchmarks/e2e.py --trace_dir`; every `*.xplane.pb` under it is
read). Kernel events are taken from the GPU planes' stream lines only (the "XLA Ops" and "XLA Modules" lines cover
the same time again). Prints each kernel name's total, count and share of all kernel time, and the time from the
first kernel to the end of the last with how much of it no kernel ran (the gaps between launches), per step with
--steps.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys

from jax.profiler import ProfileData


def kernel_times(path: str, spans: list | None = None) -> tuple[dict[str, list[float]], set[str]]:
    """({kernel name: [total ns, count]} over the GPU stream lines of one xplane file, the GPU lines' names);
    each kernel's (start ns, end ns) appended to `spans` if given."""
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    names = set()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            names.add(line.name)
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                out[ev.name][0] += ev.duration_ns
                out[ev.name][1] += 1
                if spans is not None:
                    spans.append((ev.start_ns, ev.end_ns))
    return out, names


def idle_between(spans: list) -> tuple[float, float]:
    """(ns from the first kernel's start to the last one's end, ns of that with no kernel running)."""
    if not spans:
        return 0.0, 0.0
    spans = sorted(spans)
    idle, reach = 0.0, spans[0][1]
    for start, end in spans[1:]:
        idle += max(0.0, start - reach)
        reach = max(reach, end)
    return reach - spans[0][0], idle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1, help="divide the totals by this many steps")
    args = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        print(f"error: no *.xplane.pb under {args.trace_dir}", file=sys.stderr)
        return 2
    for path in files:
        spans = []
        times, lines = kernel_times(path, spans)
        total = sum(t for t, _ in times.values())
        span, idle = idle_between(spans)
        print(f"{path}: {total / 1e6 / args.steps:.3f} ms of GPU kernels per step, {len(times)} kernel names")
        print(f"  first kernel's start to last one's end: {span / 1e6 / args.steps:.3f} ms per step, of which "
              f"{idle / 1e6 / args.steps:.3f} ms no kernel ran")  # fmt: skip
        print(f"  GPU lines: {sorted(lines)}")
        for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {t / 1e6 / args.steps:9.3f} ms  {n / args.steps:7.1f}x  {100 * t / total:5.1f}%  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
