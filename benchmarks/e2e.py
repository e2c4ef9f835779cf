"""End-to-end decode throughput of the engine: Llama-3.1-8B shapes, random bf16 weights, several KV manifests.

For each context and manifest: the planner's largest batch that fits the device's free memory (after the weights),
then `Engine.step()` timed over decode steps at batch `--batch` (or that largest batch when smaller; optionally also
at the largest batch), the whole step included: model, paged attention over quantized pages, packed writes,
scheduling, sampling and the host round trip. The cache is filled with random K/V by the benchmark-only
`Engine.fill_random` (no 16K-token prefill per sequence), so the timed steps are decode steps at that context.

    PYTHONPATH=. python3 benchmarks/e2e.py --out /tmp/e2e.json                       # GPU, the full comparison
    PYTHONPATH=. python3 benchmarks/e2e.py --shape tiny --contexts 64,128 --batch 4 --kv_budget_gb 0.01 --steps 3

Device memory: `--kv_budget_gb` unset sizes the pool from `planner.device_budget_bytes`, i.e. XLA's `bytes_limit`
(the client preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU, 0.75 by default) minus what is in use (the
weights), times --mem_fraction, minus --reserve_gb. The compiled step needs little besides the donated cache and the
weights (XLA's buffer assignment: 29 MiB of temporaries for the 8B step on the H100, independent of the pool;
`benchmarks/step_memory.py` prints it), and `fill_random` rewrites each layer in place, so a full-memory run is

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python3 benchmarks/e2e.py --mem_fraction 0.95 --reserve_gb 2 \
        --measure_max_batch --out /tmp/e2e_full.json

Manifests: 16/16 (bf16 cache), 8/8, the upstream KVTuner 3.25-bit schedule (configs/llama31_8b_kvtuner_3.25bit.json),
4/4, 2/2; uniform ones use the schedule's KIVI layout (K per channel, V per token, groups of 32, residual 32) unless
--uniform_layout=pertoken. Targets (reported, not asserted): at 16K the 3.25-bit schedule holds >= 3x the concurrent
tokens of 16/16 and decodes >= 1.5x its tokens/s. `--kernel_options` (JSON) hands keyword options to every GPU
attention kernel call of the run, to time options that are not defaults yet (one set per run; each run measures its
own 16/16 baseline). `--trace_dir DIR` also runs `--steps` more (untimed) steps per manifest under JAX's profiler;
`benchmarks/trace_summary.py DIR --steps N` then sums the GPU kernels of a step by name (e.g. how much of a step is
decode attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import inspect
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from kvtuner_jax import cache as kc
from kvtuner_jax import manifest as mf
from kvtuner_jax import model, planner
from kvtuner_jax.engine import Engine
from kvtuner_jax.errors import CacheError
from kvtuner_jax.sampling import SamplingParams
from pallas_kernels.paged_attention import PRECISIONS

SCHEDULE = Path(__file__).resolve().parent.parent / "configs" / "llama31_8b_kvtuner_3.25bit.json"
DEFAULT_MANIFESTS = ("16/16", "8/8", "kvtuner3.25", "4/4", "2/2")


def model_config(shape: str) -> model.ModelConfig:
    if shape == "llama31_8b":
        # named like the schedule's model so the engine's manifest check passes
        return dataclasses.replace(model.llama31_8b_config("bfloat16"), name="Meta-Llama-3.1-8B-Instruct")
    if shape == "tiny":
        return dataclasses.replace(model.tiny_config("bfloat16"), head_dim=64, max_position_embeddings=1 << 20)
    raise SystemExit(f"error: --shape must be llama31_8b or tiny, got {shape!r}")


def layout_settings(layout: str, head_dim: int) -> dict:
    if layout == "kivi":
        g = min(32, head_dim)
        return dict(k_axis="channel", v_axis="token", k_group_size=g, v_group_size=g, residual_length=32)
    return dict(k_axis="token", v_axis="token", residual_length=0)


def build_manifest(name: str, cfg: model.ModelConfig, layout: str) -> mf.Manifest:
    ident = mf.ModelIdentity(cfg.name, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if name == "16/16":
        return mf.uniform(ident, 16, 16)
    if name == "kvtuner3.25":
        sched = mf.load(SCHEDULE)
        if sched.model == ident:
            return sched
        # other shapes (CPU smoke runs): the schedule's first layers' bits with the same layout
        bits = [sched.layer_bits()[i % sched.num_layers] for i in range(cfg.num_layers)]
        return mf.mixed(ident, bits, **layout_settings("kivi", cfg.head_dim))
    k, v = (int(x) for x in name.split("/"))
    return mf.uniform(ident, k, v, **layout_settings(layout, cfg.head_dim))


def mem_line(tag: str) -> None:
    """Prints the device allocator's bytes in use / peak / limit (GPU); nothing on backends without the stats."""
    st = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" in st:
        gib = {k: st.get(k, 0) / 2**30 for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}
        print(f"  memory {tag}: in use {gib['bytes_in_use']:.2f} GiB, peak {gib['peak_bytes_in_use']:.2f}, "
              f"limit {gib['bytes_limit']:.2f}", flush=True)  # fmt: skip


def decode_engine(cfg, params, manifest, batch: int, max_len: int, page_size: int, **kw) -> Engine:
    """An engine of `batch` sequences of up to `max_len` tokens whose pool holds exactly the pages they need."""
    min_r = min(s.residual_length for s in manifest.layer_specs())
    pages = batch * max(1, (max_len - min_r) // page_size)
    return Engine(cfg, params, manifest, max_seqs=batch, max_seq_len=max_len, page_size=page_size, num_pages=pages,
                  eos_ids=(), **kw)  # fmt: skip


def time_decode(cfg, params, manifest, batch, context, args, trace: str | None = None) -> dict:
    """Engine at `batch` sequences of `context` cached tokens: seconds per decode step (median of --repeats).
    `trace`: a folder for a JAX profiler trace of `--steps` more steps after the timed ones (not timed;
    `benchmarks/trace_summary.py` sums its GPU kernels)."""
    steps = args.warmup + args.steps * (args.repeats + bool(trace))
    max_len = context + steps + 2
    eng = decode_engine(
        cfg, params, manifest, batch, max_len, args.page_size, backend=args.backend, precision=args.precision
    )
    # one token more than the timed steps: the requests are still running when the stats are read
    mem_line(f"engine of {batch} x {context} allocated")
    eng.fill_random(batch, context, seed=0, sampling=SamplingParams(max_new_tokens=steps + 1))
    mem_line("after fill_random")
    for _ in range(args.warmup):
        eng.step()
    mem_line("after warm-up steps")
    compiles = eng.compiles
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            outs = eng.step()  # returns after the sampled tokens reached the host: the step is complete
        times.append((time.perf_counter() - t0) / args.steps)
        assert len(outs) == batch, (len(outs), batch)
    if trace:
        with jax.profiler.trace(trace):
            for _ in range(args.steps):
                eng.step()
    stats = eng.stats()
    assert eng.compiles == compiles, "a timed step recompiled"
    del eng
    gc.collect()
    mem_line("after the engine is freed")
    dt = float(np.median(times))
    return {
        "batch": batch,
        "ms_per_step": 1e3 * dt,
        "tokens_per_s": batch / dt,
        "kv_bytes_pool": stats["kv_bytes_pool"],
        "kv_bytes_in_use": stats["kv_bytes_in_use"],
    }


SET_BY_DISPATCHER = ("k_spec", "v_spec", "sm_scale", "interpret", "precision")  # precision: --precision


def use_kernel_options(options: dict):
    """Every GPU paged-attention call of this process gets `options` (keywords of
    `pallas_kernels.paged_attention_gpu.paged_attention`; the dispatcher looks the kernel up at call time, so this
    must run before the first step is traced). Returns a function that undoes it."""
    from pallas_kernels import paged_attention_gpu as gpu

    if not isinstance(options, dict):
        raise TypeError(f"expected a JSON object of kernel keywords, got {options!r}")
    plain = gpu.paged_attention
    params = inspect.signature(plain).parameters
    settable = sorted(k for k, v in params.items() if v.kind == v.KEYWORD_ONLY and k not in SET_BY_DISPATCHER)
    unknown = sorted(set(options) - set(settable))
    if unknown:
        raise ValueError(f"unknown GPU kernel option(s) {unknown}; settable: {settable}")
    if not options:
        return lambda: None

    @functools.wraps(plain)
    def with_options(*args, **kw):
        return plain(*args, **{**options, **kw})

    gpu.paged_attention = with_options

    def restore():
        gpu.paged_attention = plain

    return restore


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama31_8b", help="llama31_8b, or tiny for CPU smoke runs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--manifests", default=",".join(DEFAULT_MANIFESTS), help="16/16, K/V pairs, kvtuner3.25")
    p.add_argument("--uniform_layout", choices=["kivi", "pertoken"], default="kivi")
    p.add_argument("--page_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kv_budget_gb", type=float, default=None, help="KV budget (default: free device memory)")
    p.add_argument("--mem_fraction", type=float, default=0.9, help="of free memory after the weights")
    p.add_argument("--reserve_gb", type=float, default=4.0, help="kept free for activations and compile scratch")
    p.add_argument("--measure_max_batch", action="store_true", help="also time each manifest at its largest batch")
    p.add_argument("--max_batch_cap", type=int, default=512)
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="paged-attention operand precision")
    p.add_argument(
        "--kernel_options",
        default="{}",
        help="JSON keyword options for the GPU attention kernel in this run, e.g. "
        '\'{"eight_bit":"nibbles","_variant":"w32"}\' (A/B against the defaults; see BENCHMARKS.md)',
    )
    p.add_argument("--trace_dir", default=None, help="also trace --steps more steps per manifest (not timed) here")
    p.add_argument("--out", default="e2e.json")
    args = p.parse_args(argv)
    try:
        use_kernel_options(json.loads(args.kernel_options))
    except (ValueError, TypeError) as e:
        print(f"error: --kernel_options: {e}", file=sys.stderr)
        return 2

    cfg = model_config(args.shape)
    contexts = [int(x) for x in args.contexts.split(",")]
    names = args.manifests.split(",")
    t0 = time.perf_counter()
    params = model.init_random_params(cfg, jax.random.key(0))
    jax.block_until_ready(params)
    print(f"{cfg.name} random {cfg.dtype} weights in {time.perf_counter() - t0:.1f} s on {jax.devices()[0]}")
    try:
        if args.kv_budget_gb is not None:
            budget = int(args.kv_budget_gb * 2**30)
        else:
            budget = planner.device_budget_bytes(args.mem_fraction, int(args.reserve_gb * 2**30))
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"KV budget {budget / 2**30:.2f} GiB")
    manifests = {n: build_manifest(n, cfg, args.uniform_layout) for n in names}
    rows = []
    for context in contexts:
        for name, m in manifests.items():
            specs = m.layer_specs()
            probe = kc.CacheConfig(
                cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, args.page_size, 1, 1, dtype="bfloat16"
            )
            longest = context + args.warmup + args.steps * (args.repeats + bool(args.trace_dir)) + 2
            max_batch = planner.max_batch_for_budget(specs, probe, budget, longest)
            row = {
                "manifest": name,
                "context": context,
                "effective_bits": planner.effective_bits(specs, probe),
                "max_batch": max_batch,
                "max_concurrent_tokens": max_batch * context,
            }
            batch = min(args.batch, max_batch)
            if batch == 0:
                row["note"] = "not even one sequence fits"
                rows.append(row)
                continue
            row["note"] = "" if batch == args.batch else f"batch {args.batch} does not fit; ran {batch}"
            trace = args.trace_dir and f"{args.trace_dir}/{name.replace('/', 'x')}_{context}_b{batch}"
            row.update(time_decode(cfg, params, m, batch, context, args, trace=trace))
            if args.measure_max_batch:
                mb = min(max_batch, args.max_batch_cap)
                if mb != batch:
                    r2 = time_decode(cfg, params, m, mb, context, args)
                    row["at_max_batch"] = r2
                row["tokens_per_s_at_max_batch"] = largest_batch_tokens_per_s(row)
            rows.append(row)
            print(json.dumps(row))
    compare_to_16(rows)
    report = {
        "model": cfg.name,
        "device": str(jax.devices()[0]),
        "kv_budget_bytes": budget,
        "args": vars(args),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(rows)
    for r in rows:
        if r["manifest"] == "kvtuner3.25" and r["context"] == max(contexts):
            ct, tp = r.get("concurrent_tokens_vs_16"), r.get("tokens_per_s_vs_16")
            tpm = r.get("tokens_per_s_at_max_batch_vs_16")
            print(
                f"target at {r['context']}: 3.25-bit concurrent tokens {ct or float('nan'):.2f}x of 16/16 "
                f"(target >= 3x), decode tokens/s {tp or float('nan'):.2f}x at batch {r.get('batch')} vs 16/16 at "
                f"its batch, {tpm or float('nan'):.2f}x with each at its largest batch (target >= 1.5x)"
            )
    print(f"wrote {args.out}")
    return 0


def largest_batch_tokens_per_s(row: dict) -> float:
    """Tokens/s of a row at its largest batch: the extra run there, or the row itself when its batch was that."""
    return row.get("at_max_batch", row)["tokens_per_s"]


def compare_to_16(rows: list[dict]) -> None:
    """Adds ratios against the 16/16 row of the same context: concurrent tokens, tokens/s at the benchmark batch
    (or the most that fits), and tokens/s with each manifest at its largest batch (rows timed there)."""
    base = {r["context"]: r for r in rows if r["manifest"] == "16/16"}
    for r in rows:
        b = base.get(r["context"])
        if b is None:
            continue
        if b.get("max_concurrent_tokens"):
            r["concurrent_tokens_vs_16"] = r["max_concurrent_tokens"] / b["max_concurrent_tokens"]
        if "tokens_per_s" in r and "tokens_per_s" in b:
            r["tokens_per_s_vs_16"] = r["tokens_per_s"] / b["tokens_per_s"]
        if "tokens_per_s_at_max_batch" in r and "tokens_per_s_at_max_batch" in b:
            r["tokens_per_s_at_max_batch_vs_16"] = r["tokens_per_s_at_max_batch"] / b["tokens_per_s_at_max_batch"]


def print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="end-to-end decode (engine steps)")
    cols = ["context", "manifest", "eff. bits", "max batch", "batch", "ms/step", "tokens/s", "x 16/16 tok/s",
            "x 16/16 tok/s, largest batches", "x 16/16 conc.", "note"]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("manifest", "note") else "right")
    for r in rows:
        t.add_row(
            str(r["context"]),
            r["manifest"],
            f"{r['effective_bits']:.2f}",
            str(r["max_batch"]),
            str(r.get("batch", 0)),
            f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else "",
            f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "",
            f"{r['tokens_per_s_vs_16']:.2f}" if "tokens_per_s_vs_16" in r else "",
            f"{r['tokens_per_s_at_max_batch_vs_16']:.2f}" if "tokens_per_s_at_max_batch_vs_16" in r else "",
            f"{r['concurrent_tokens_vs_16']:.2f}" if "concurrent_tokens_vs_16" in r else "",
            r.get("note", ""),
        )
    Console(width=160).print(t)


if __name__ == "__main__":
    sys.exit(main())
