"""benchmarks/attention.py's bookkeeping around a GPU run (the timing itself needs a GPU): a tuning whose check
raises or misses its tolerance is recorded and skipped, not allowed to end a run whose other tunings are fine (device
time is scarce), the schedule is skipped when any of its layer pairs failed, and the A/B summary puts each tuning's
time beside the first tuning's."""

from __future__ import annotations

import pathlib

import pytest
from _bench import load_benchmark

from kvtuner_jax.specs import KVSpec

bench = load_benchmark("attention.py", "attention_bench")
summary = load_benchmark("trace_summary.py")

BF16, F16 = {"precision": "bf16"}, {"precision": "bf16", "eight_bit": "f16"}


def test_failed_checks_are_recorded_and_skipped():
    def check(c, t):
        if c == "8/8" and t == F16:
            raise RuntimeError("triton: does not compile")
        if c == "sched2/2" and t == F16:
            return 0.5  # far above bf16's 1e-2
        return 3e-3

    errors, failed = bench.run_checks(["8/8", "4/4", "sched4/2", "sched2/2"], [BF16, F16], check)
    assert set(failed) == {
        '8/8@{"precision":"bf16","eight_bit":"f16"}',
        'sched2/2@{"precision":"bf16","eight_bit":"f16"}',
    }
    assert "does not compile" in failed['8/8@{"precision":"bf16","eight_bit":"f16"}']
    assert errors['4/4@{"precision":"bf16"}'] == 3e-3 and len(errors) == 7
    distinct = [(4, 2), (2, 2)]
    assert bench.failed_check("8/8", F16, 2, distinct, failed).startswith("failed its check (8/8)")
    assert bench.failed_check("schedule", F16, 2, distinct, failed) == "failed its check (sched2/2)"
    assert bench.failed_check("schedule", BF16, 2, distinct, failed) is None
    assert bench.failed_check("4/4", F16, 2, distinct, failed) is None
    assert bench.check_tolerance({}) == 1e-3 and bench.check_tolerance(BF16) == 1e-2


def test_ab_summary_puts_each_tuning_beside_the_first():
    rows = [
        dict(batch=32, context=16384, config="jax_bf16", time_s=8.5e-4),
        dict(batch=32, context=16384, config="8/8@a", base="8/8", tuning=BF16, time_s=1.0e-3),
        dict(batch=32, context=16384, config="8/8@b", base="8/8", tuning=F16, time_s=6.0e-4),
        dict(batch=32, context=16384, config="4/4@a", base="4/4", tuning=BF16, time_s=4.0e-4),
        dict(batch=32, context=16384, config="4/4@b", base="4/4", tuning=F16, skipped="failed its check (4/4)"),
    ]
    lines = bench.ab_summary(rows, [BF16, F16])
    assert lines == [
        'B=32 ctx=16384 8/8: {"precision":"bf16"}: 1.000 (x1.000); {"precision":"bf16","eight_bit":"f16"}: 0.600 '
        "(x0.600)",
        'B=32 ctx=16384 4/4: {"precision":"bf16"}: 0.400 (x1.000); {"precision":"bf16","eight_bit":"f16"}: failed its '
        "check (4/4)",
    ]


def test_store_scales_shrink_with_the_code_range():
    """Random pools dequantize to the same magnitude at every bit width (scale x (2^bits - 1) within 4-bit's 0.02-0.3
    x 15), as quantizing one model's cache would: with one scale range for all, 8-bit keys were ~17x larger than 4-bit
    ones and sent every split of the fixed softmax to its redo."""
    import jax
    import numpy as np

    from kvtuner_jax.specs import KVSpec

    for bits in (2, 4, 8):
        spec = KVSpec(bits=bits, axis="token", group_size=64)
        codes, scale, zero = bench.make_store(jax.random.key(bits), spec, 6, 16)
        span = np.asarray(scale, np.float32) * (2**bits - 1)
        assert span.min() >= 0.02 * 15 * 0.99 and span.max() <= 0.3 * 15 * 1.01, bits
        assert span.max() - span.min() > 0.5 * (0.3 - 0.02) * 15  # drawn over the range, not one value
        assert int(np.asarray(codes).max()) > 200 and zero is not None


def test_kernel_choice_is_checked():
    """`{"kernel": ...}` in a tuning picks the dispatcher's choice, the Triton or the Mosaic GPU kernel; anything
    else is refused by name."""
    spec = KVSpec(bits=4, axis="token", group_size=bench.D)
    with pytest.raises(ValueError, match="kernel='cuda'"):
        bench.paged_attention(None, k_spec=spec, v_spec=spec, kernel="cuda")
    with pytest.raises(ValueError, match="paged_attention_mgpu: keys: 16-bit"):
        bench.check_small(KVSpec(bits=16), spec, 64, {"kernel": "mgpu"})


def test_trace_dir_traces_one_more_run(tmp_path):
    """`--trace_dir`: `timed` traces one more run of `reps` calls after the timed ones, in a folder named by the
    measurement, and `benchmarks/trace_summary.py` reads it (the CPU trace has no GPU kernels to sum)."""
    import jax.numpy as jnp
    import numpy as np

    class Args:
        trace_dir = str(tmp_path / "trace")

    folder = bench.trace_folder(Args, '4/4@{"kernel":"mgpu"}', 32, 16384)
    assert folder == str(tmp_path / "trace" / "4_4_kernel_mgpu_b32_16384")
    Args.trace_dir = None
    assert bench.trace_folder(Args, "4/4", 32, 16384) is None
    rng = np.random.default_rng(0)
    fixed = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
    args_list = [(jnp.asarray(rng.standard_normal((64,)), jnp.float32),) for _ in range(2)]
    t = bench.timed(lambda m, v: m @ v, fixed, args_list, reps=3, trials=1, trace=folder)
    assert t > 0
    assert len(list(pathlib.Path(folder).glob("**/*.xplane.pb"))) == 1
    assert summary.main([folder, "--steps", "3"]) == 0


@pytest.mark.parametrize("loop", ["fori", "unrolled"])
def test_harness_runs_every_call_on_its_rotating_inputs(loop):
    """Both timing loops sum each call's first output element over `reps` calls of args i % n: checked against
    float64 numpy. Written out, XLA must keep all `reps` calls (equal inputs recur every n calls; a merged call would
    make the timing a lie): the compiled executable holds one dot per call."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng()
    m = rng.standard_normal((16, 16)).astype(np.float32)
    vs = [rng.standard_normal((16,)).astype(np.float32) for _ in range(3)]
    reps = 7
    many, stacked = bench.harness(lambda a, v: a @ v, [(jnp.asarray(v),) for v in vs], reps, loop)
    got = float(many(jnp.asarray(m), stacked))
    want = sum((m.astype(np.float64) @ vs[i % 3].astype(np.float64))[0] for i in range(reps))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if loop == "unrolled":
        hlo = jax.jit(many).lower(jnp.asarray(m), stacked).compile().as_text()
        assert hlo.count(" dot(") == reps
    with pytest.raises(ValueError, match="loop='scan'"):
        bench.harness(lambda a, v: a @ v, [(jnp.asarray(vs[0]),)], reps, "scan")


def test_trace_idle_time_between_kernels():
    """trace_summary's gaps between kernels (overlapping kernels on several streams counted once) against a
    nanosecond timeline in numpy, on random intervals."""
    import numpy as np

    rng = np.random.default_rng()
    for _ in range(20):
        starts = rng.integers(0, 2000, size=rng.integers(1, 12))
        spans = [(int(s), int(s + rng.integers(1, 300))) for s in starts]
        busy = np.zeros(3000, bool)
        for s, e in spans:
            busy[s:e] = True
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        span, idle = summary.idle_between(spans)
        assert span == last - first
        assert idle == np.count_nonzero(~busy[first:last])
    assert summary.idle_between([]) == (0.0, 0.0)
