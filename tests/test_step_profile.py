"""benchmarks/step_profile.py: device time per step summed by kernel from a profiler trace (XSpace)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from jax.profiler import ProfileData

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import step_profile  # noqa: E402

MS = 10**9  # picoseconds per millisecond

# A GPU plane with one stream line (the kernels) and a derived "XLA Ops" line that repeats them (not counted), and a
# host plane (not counted).
TRACE = f"""
planes {{
  id: 1
  name: "/device:GPU:0"
  lines {{ id: 1 name: "Stream #13(Compute)"
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: {3 * MS} }}
    events {{ metadata_id: 2 offset_ps: {4 * MS} duration_ps: {MS // 2} }}
    events {{ metadata_id: 1 offset_ps: {5 * MS} duration_ps: {1 * MS} }}
    events {{ metadata_id: 3 offset_ps: {7 * MS} duration_ps: {MS // 4} }}
    events {{ metadata_id: 4 offset_ps: {8 * MS} duration_ps: {MS // 8} }} }}
  lines {{ id: 2 name: "XLA Ops" events {{ metadata_id: 2 offset_ps: 0 duration_ps: {9 * MS} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "kv_paged_attention_k4c_v2t" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NNT" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "quantize_write_b4_channel" }} }}
  event_metadata {{ key: 4 value {{ id: 4 name: "loop_add_fusion" }} }}
}}
planes {{ id: 2 name: "/host:CPU"
  lines {{ id: 1 name: "python" events {{ metadata_id: 1 duration_ps: {50 * MS} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "step" }} }} }}
"""


def test_summarize_sums_stream_kernels_per_step():
    s = step_profile.summarize(ProfileData.from_text_proto(TRACE), steps=2)
    assert s["device_ms_per_step"] == pytest.approx((3 + 0.5 + 1 + 0.25 + 0.125) / 2)
    assert s["groups_ms_per_step"] == pytest.approx(
        {"paged attention": 2.0, "matrix products": 0.25, "packed write": 0.125, "other": 0.0625}
    )
    assert list(s["groups_ms_per_step"]) == ["paged attention", "matrix products", "packed write", "other"]
    att = s["kernels"]["kv_paged_attention_k4c_v2t"]
    assert att == pytest.approx({"ms": 2.0, "count": 1.0})
    assert list(s["kernels"])[0] == "kv_paged_attention_k4c_v2t"


def test_cpu_smoke_run(tmp_path):
    """The whole script on the tiny model on CPU: a summary with the step's ops and a wall time."""
    out = tmp_path / "prof.json"
    argv = ["--shape", "tiny", "--context", "64", "--batch", "2", "--steps", "1", "--warmup", "1", "--out", str(out)]
    assert step_profile.main(argv) == 0
    s = json.loads(out.read_text())
    assert s["wall_ms_per_step"] > 0 and s["device_ms_per_step"] > 0
    assert s["kernels"] and all(k["count"] > 0 for k in s["kernels"].values())
