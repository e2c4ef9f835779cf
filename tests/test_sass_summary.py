"""benchmarks/sass_summary.py against Nsight Compute's own totals for the listings kept in notes/ncu.

The per-instruction counts of the SASS source page (what the summary adds up) and the kernel-wide
`smsp__inst_executed.sum` metric are collected by different Nsight passes, so their agreement checks the parsing.
"""

from __future__ import annotations

import pathlib
import re

import pytest
from _bench import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
sass_summary = load_benchmark("sass_summary.py")


@pytest.mark.parametrize("name", ["h200_4x4_bf16", "h200_kivi4x2_bf16", "h200_kivi4x2_bf16_stack"])
def test_summary_totals_equal_nsight_metric(name, capsys):
    listing = ROOT / "notes" / "ncu" / f"{name}_sass.csv.gz"
    metric = (ROOT / "notes" / "ncu" / f"{name}_opcodes.txt").read_text()
    want = int(re.search(r"smsp__inst_executed\.sum\s+inst\s+([\d,]+)", metric).group(1).replace(",", ""))
    header, rows = sass_summary.rows(str(listing))
    ix = header.index("Instructions Executed")
    assert sum(int(r[ix]) for r in rows) == want
    sass_summary.main([str(listing)])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{want:,} instructions")
    # 64-token blocks of one KV head at batch 32 x 16K with 8 KV heads, 4 warps each: the per-warp figure quoted in
    # BENCHMARKS.md
    assert re.search(r"(\d+) per warp per block", first).group(1) == str(round(want / (32 * 8 * 256 * 4)))
