"""benchmarks/mgpu_trace.py: a Mosaic GPU profiler trace summed by region, on a random synthetic trace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import mgpu_trace


def _trace(rng, tids=3, pages=5):
    """Per tid: pages of [a, b (with c nested inside)], random gaps; returns events and the expected sums (cycles)."""
    events, want, wall = [], {"a": [0, 0.0], "b": [0, 0.0], "c": [0, 0.0]}, 0.0
    for tid in range(tids):
        t = float(rng.integers(0, 1000))
        start = None
        for _ in range(pages):
            for name in ("a", "b"):
                t += rng.integers(1, 20)
                events.append(dict(name=name, ph="B", ts=t / 1e3, tid=tid, pid=1))
                begin = t
                start = t if start is None else start
                if name == "b":
                    t += rng.integers(1, 20)
                    events.append(dict(name="c", ph="B", ts=t / 1e3, tid=tid, pid=1))
                    c0 = t
                    t += rng.integers(1, 50)
                    events.append(dict(name="c", ph="E", ts=t / 1e3, tid=tid, pid=1))
                    want["c"][0] += 1
                    want["c"][1] += t - c0
                t += rng.integers(1, 50)
                events.append(dict(name=name, ph="E", ts=t / 1e3, tid=tid, pid=1))
                want[name][0] += 1
                want[name][1] += t - begin
        wall += t - start
    rng.shuffle(events)  # the dump orders by time over all traces; the summary must not rely on order
    return events, want, wall


def test_sums_regions_per_trace(tmp_path, capsys):
    rng = np.random.default_rng(0)
    events, want, wall = _trace(rng)
    got = mgpu_trace.summarize(events)
    assert got["__wall__"][0] == 3
    assert got["__wall__"][1] == pytest.approx(wall, rel=1e-9)
    for name, (count, cycles) in want.items():
        assert got[name][0] == count
        assert got[name][1] == pytest.approx(cycles, rel=1e-9)
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    mgpu_trace.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{want['c'][1] / want['c'][0]:.1f}" in out


def test_unbalanced_trace_is_refused():
    ev = [dict(name="a", ph="B", ts=0.0, tid=0), dict(name="b", ph="E", ts=1.0, tid=0)]
    with pytest.raises(ValueError, match="unbalanced"):
        mgpu_trace.summarize(ev)
