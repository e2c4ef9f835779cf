"""benchmarks/e2e.py's comparison against the 16/16 row, on the rows of a stored H200 run (notes/)."""

from __future__ import annotations

import json
import pathlib

import pytest
from _bench import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
e2e = load_benchmark("e2e.py", "e2e_bench")


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


def test_kernel_options_reach_the_gpu_kernel_through_the_dispatcher(rng):
    """`--kernel_options` wraps the GPU kernel the dispatcher looks up at call time: a call through the dispatcher
    then equals the kernel called with those options, bit for bit (8/8 with eight_bit="nibbles", which changes the
    numbers), and `restore` undoes it; unknown or dispatcher-owned keywords are refused by name."""
    import jax.numpy as jnp
    import numpy as np

    from kvtuner_jax.specs import KVSpec
    from pallas_kernels import layout
    from pallas_kernels import paged_attention_gpu as gpu
    from pallas_kernels.paged_attention import paged_attention as dispatch

    spec = KVSpec(bits=8, axis="token", group_size=64)
    pools = []
    for _ in range(2):
        codes, scale, zero = layout.allocate(spec, 1, 4, 16, 64)
        pools += [jnp.asarray(rng.integers(0, 256, codes.shape, dtype=np.uint8)),
                  jnp.asarray(rng.uniform(0.02, 0.3, scale.shape), scale.dtype),
                  jnp.asarray(rng.normal(0, 1, zero.shape), zero.dtype)]  # fmt: skip
    q = jnp.asarray(rng.standard_normal((1, 2, 1, 64)), jnp.float32)
    pt, nt = jnp.asarray([[2, 0, 3, -1]], jnp.int32), jnp.asarray([48], jnp.int32)
    kw = dict(k_spec=spec, v_spec=spec, sm_scale=0.125, interpret=True)
    want = gpu.paged_attention(q, *pools, pt, nt, eight_bit="nibbles", **kw)
    plain = gpu.paged_attention(q, *pools, pt, nt, **kw)
    restore = e2e.use_kernel_options({"eight_bit": "nibbles"})
    try:
        got = dispatch(q, *pools, pt, nt, backend="gpu", **kw)
    finally:
        restore()
    assert gpu.paged_attention is not None and e2e.use_kernel_options({})() is None
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert not np.array_equal(np.asarray(want[0]), np.asarray(plain[0]))
    again = dispatch(q, *pools, pt, nt, backend="gpu", **kw)  # restored: the default again
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(plain[0]))
    for bad in ({"eigth_bit": "f16"}, {"sm_scale": 1.0}):
        with pytest.raises(ValueError, match=f"unknown GPU kernel option.*{next(iter(bad))}"):
            e2e.use_kernel_options(bad)


def test_trace_dir_traces_steps_after_the_timed_ones(tmp_path, capsys):
    """`--trace_dir` writes a profiler trace of `--steps` more steps per manifest, after (and apart from) the timed
    repeats, and `benchmarks/trace_summary.py` reads it (on the CPU the trace has no GPU kernels to sum)."""
    summary = load_benchmark("trace_summary.py")
    out = tmp_path / "e2e.json"
    args = ["--shape", "tiny", "--contexts", "64", "--batch", "2", "--kv_budget_gb", "0.01", "--steps", "2",
            "--repeats", "1", "--warmup", "1", "--manifests", "8/8", "--uniform_layout", "pertoken",
            "--trace_dir", str(tmp_path / "trace"), "--out", str(out)]  # fmt: skip
    e2e.main(args)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ms_per_step"] > 0 and row["batch"] == 2
    traces = list((tmp_path / "trace").glob("8x8_64_b2/**/*.xplane.pb"))
    assert len(traces) == 1
    capsys.readouterr()
    assert summary.main([str(tmp_path / "trace"), "--steps", "2"]) == 0
    assert "0.000 ms of GPU kernels per step" in capsys.readouterr().out
    assert summary.main([str(tmp_path / "none")]) == 2
