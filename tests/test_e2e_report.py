"""benchmarks/e2e.py's comparison against the 16/16 row, on the rows of a stored H200 run (notes/)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("e2e_bench", ROOT / "benchmarks" / "e2e.py")
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)


def test_ratios_at_the_benchmark_batch_and_at_each_largest_batch():
    rows = json.loads((ROOT / "notes" / "e2e_h200_16k_bf16_session6.json").read_text())["rows"]
    rows = [{k: v for k, v in r.items() if not k.endswith("_vs_16")} for r in rows]  # recompute them
    for r in rows:
        r["tokens_per_s_at_max_batch"] = e2e.largest_batch_tokens_per_s(r)
    e2e.compare_to_16(rows)
    full, sched = rows
    assert full["batch"] == full["max_batch"] == 27 and "at_max_batch" not in full  # 16/16 ran at its largest
    assert sched["batch"] == 64 and sched["at_max_batch"]["batch"] == sched["max_batch"] == 102
    assert sched["concurrent_tokens_vs_16"] == pytest.approx(102 / 27)
    assert sched["tokens_per_s_vs_16"] == pytest.approx(sched["tokens_per_s"] / full["tokens_per_s"])
    want = sched["at_max_batch"]["tokens_per_s"] / full["tokens_per_s"]
    assert sched["tokens_per_s_at_max_batch_vs_16"] == pytest.approx(want)
    assert 1.1 < want < 1.5  # what BENCHMARKS.md reports for this run (1.18x)
    assert full["tokens_per_s_at_max_batch_vs_16"] == 1.0
