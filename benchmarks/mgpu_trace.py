"""Sum a Mosaic GPU profiler trace by named region: where one warpgroup's time goes, per page.

The Mosaic GPU attention kernel (`pallas_kernels/paged_attention_mgpu.py`) names the steps of its per-page chain
(`jax.named_scope`); with `profile_dir` set, Mosaic GPU records each region's start and end (the SM's cycle counter,
one thread per warpgroup) and writes a Chrome trace. This prints, per region, how often it ran, its mean length and
its share of the warpgroups' summed wall time. On the device, e.g.:

    python3 benchmarks/attention.py --once 4/4 --batches 32 --contexts 2048 \\
        --tuning '{"kernel":"mgpu","profile_dir":"/tmp/trace"}'
    python3 benchmarks/mgpu_trace.py /tmp/trace

Times are cycles (the trace's "ts" is the cycle counter / 1000); the profiler's own stores add ~10 cycles a region.
The kernel creates `profile_dir`; Mosaic GPU keeps the first trace of a kernel there and warns for later calls.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict


def summarize(events: list[dict]) -> dict:
    """Chrome trace events (B/E pairs per tid, nested by name) -> {region: (count, total cycles)} and the summed
    wall time of all traces ("__wall__": first begin to last end per tid)."""
    per_tid = defaultdict(list)
    for e in events:
        per_tid[e["tid"]].append(e)
    totals: dict = defaultdict(lambda: [0, 0.0])
    wall = 0.0
    for evs in per_tid.values():
        evs.sort(key=lambda e: e["ts"])
        stack = []
        for e in evs:
            if e["ph"] == "B":
                stack.append(e)
            else:
                b = stack.pop()
                if b["name"] != e["name"]:
                    raise ValueError(f"unbalanced trace: {b['name']!r} closed by {e['name']!r}")
                totals[e["name"]][0] += 1
                totals[e["name"]][1] += (e["ts"] - b["ts"]) * 1e3
        wall += (evs[-1]["ts"] - evs[0]["ts"]) * 1e3
    out = {k: tuple(v) for k, v in totals.items()}
    out["__wall__"] = (len(per_tid), wall)
    return out


def report(summary: dict) -> list[str]:
    traces, wall = summary["__wall__"]
    lines = [f"{traces} warpgroup traces, {wall / max(traces, 1):.0f} cycles each on average"]
    lines.append(f"{'region':<12} {'count':>9} {'cycles/each':>12} {'share':>7}")
    for name, (count, cyc) in sorted(summary.items(), key=lambda kv: -kv[1][1]):
        if name != "__wall__":
            lines.append(f"{name:<12} {count:>9} {cyc / count:>12.1f} {cyc / wall:>7.1%}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a trace .json, or a directory: its newest *.json")
    args = ap.parse_args(argv)
    path = args.path
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.json")), key=os.path.getmtime)
        if not found:
            raise SystemExit(f"mgpu_trace: no *.json trace in {path}")
        path = found[-1]
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    print(path)
    print("\n".join(report(summarize(events))))


if __name__ == "__main__":
    main()
