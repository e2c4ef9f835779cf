"""Summarize the SASS listing that `benchmarks/ncu_sass.sh` writes (Nsight Compute source page, CSV): executed
instructions and warp-stall samples per opcode, normalized per warp and per 64-token block of one KV head, and the
hot loop body (instructions executed at least `--min` times per warp-block) with their stall samples; and the
stall samples by reason.

    python3 benchmarks/sass_summary.py notes/ncu/h200_4x4_bf16_sass.csv.gz --blocks 65536
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def rows(path: str) -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        data = list(csv.reader(f))
    head = next(i for i, r in enumerate(data) if r and r[0] == "Address")
    return data[head], [r for r in data[head + 1 :] if r and r[0].startswith("0x")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--blocks", type=int, default=32 * 8 * 256, help="64-token KV-head blocks in the run")
    ap.add_argument("--warps", type=int, default=4, help="warps per program")
    ap.add_argument("--min", type=float, default=0.5, help="loop body: executions per warp-block")
    ap.add_argument("--body", action="store_true", help="also print the hot loop body")
    args = ap.parse_args(argv)
    h, data = rows(args.csv)
    ix, st = h.index("Instructions Executed"), h.index("Warp Stall Sampling (All Samples)")
    norm = args.blocks * args.warps
    total = sum(int(r[ix]) for r in data)
    stalls = sum(int(r[st]) for r in data)
    ops, ops_st = collections.Counter(), collections.Counter()
    for r in data:
        words = r[1].split()
        op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
        ops[op] += int(r[ix])
        ops_st[op] += int(r[st])
    print(f"{total:,} instructions, {total / norm:.0f} per warp per block; {stalls:,} stall samples")
    print(f"{'opcode':10s} {'% inst':>7s} {'/warp/blk':>9s} {'% stalls':>8s}")
    for op, c in ops.most_common(30):
        print(f"{op:10s} {100 * c / total:7.1f} {c / norm:9.1f} {100 * ops_st[op] / stalls:8.1f}")
    reasons = [(c, i) for i, c in enumerate(h) if c.startswith("stall_") and not c.endswith("(Not Issued)")]
    by_reason = {c: sum(int(r[i] or 0) for r in data) for c, i in reasons}
    if by_reason:
        print(
            "stall samples by reason: "
            + ", ".join(
                f"{c[6:]} {100 * n / stalls:.1f}%" for c, n in sorted(by_reason.items(), key=lambda x: -x[1]) if n
            )
        )
    if args.body:
        for k, r in enumerate(data):
            if int(r[ix]) / norm >= args.min:
                print(f"{k:5d} {int(r[ix]) / norm:5.2f} {r[st]:>6s} {r[1].strip()}")


if __name__ == "__main__":
    main()
