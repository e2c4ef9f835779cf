"""Decode attention benchmark: our dequant-fused GPU kernel vs JAX's bf16 Pallas paged attention, same data, same run.

Shape: Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128), one query token per sequence, every
sequence `context` tokens long (whole pages). For each (batch, context, config) it reports the median time of one
attention call (device-synchronized; many calls per timed executable, inputs rotated so the working set is larger
than L2), GB/s on the bytes the call must read (codes + scales + zeros of K and V, page table, q), % of the best
measured copy bandwidth, the floor (bytes / that bandwidth) and the speedup over JAX's bf16 kernel at the same
(batch, context). Before timing, each config is checked against `paged_attention_reference` at a small shape.

    PYTHONPATH=. python3 benchmarks/attention.py --out /tmp/bench            # full sweep
    PYTHONPATH=. python3 benchmarks/attention.py --batches 32 --contexts 16384 --configs 4/4,2/2 --out /tmp/b

Results: <out>/attention.json and <out>/attention.csv (one row per measurement), printed as a table at the end.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax.quant import scale_dtype_of
from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout, paged_attention_gpu, paged_attention_mgpu
from pallas_kernels.paged_attention import paged_attention_reference, resolve_precision

HQ, H, D = 32, 8, 128  # Llama-3.1-8B attention shape
L2_BYTES = 50 * 2**20
SCHEDULE = "configs/llama31_8b_kvtuner_3.25bit.json"
PRESET = "/work/shared/reference/kvtuner_presets/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml"


def paged_attention(*args, k_spec: KVSpec, v_spec: KVSpec, precision: str = "high", kernel: str = "auto", **kw):
    """The GPU kernel, taking the dispatcher's precision names: "auto" resolves per layer as the engine's does.
    `kernel`: "auto" (default: what the dispatcher runs, `paged_attention_gpu.mosaic_route`: on Hopper the Mosaic
    GPU kernel for per-token layers with an 8-bit side, and for 2- and 4-bit ones at pages of 32 and 64 (since
    2026-12-06 night), else the Triton one), "triton" (the
    Triton-lowered kernel, `paged_attention_gpu`, always) or "mgpu" (the Mosaic GPU kernel for per-token 2-, 4- and
    8-bit pages, `paged_attention_mgpu`, with its own tunings; e.g. `--tunings
    '[{"kernel":"triton"},{"kernel":"mgpu"}]'`)."""
    precision = resolve_precision(precision, k_spec, v_spec)
    if kernel == "mgpu" or "int_block" in (k_spec.mode, v_spec.mode):  # mode int_block: the Mosaic GPU kernel's
        if kernel not in ("mgpu", "auto"):
            raise ValueError(f"kernel={kernel!r}: mode 'int_block' pages are read by the Mosaic GPU kernel only")
        return paged_attention_mgpu.paged_attention(*args, k_spec=k_spec, v_spec=v_spec, precision=precision, **kw)
    if kernel not in ("triton", "auto"):
        raise ValueError(f"kernel={kernel!r}: expected 'triton', 'mgpu' or 'auto'")
    return paged_attention_gpu.paged_attention(
        *args, k_spec=k_spec, v_spec=v_spec, precision=precision, kernel=kernel, **kw
    )


def spec_pair(name: str) -> tuple[KVSpec, KVSpec]:
    """'4/2' -> per-token groups of head_dim (f16 scale + min per token-head); 'kivi4/2' -> KIVI layout (keys per
    channel, G = 32; values per token, G = 32); each side may also name its layout: '4c32' = per channel, group 32;
    '2t32' = per token, group 32 (e.g. '4c32/4' or '4/4t32', for ablations); '4b' = mode int_block (per-token groups
    of head_dim, each page's scales and zero-points in its own block: '4b/4b')."""
    if name.startswith("kivi"):
        kb, vb = (int(x) for x in name.removeprefix("kivi").split("/"))
        return KVSpec(bits=kb, axis="channel", group_size=32), KVSpec(bits=vb, axis="token", group_size=32)

    def one(side: str) -> KVSpec:
        if side.endswith("b"):
            return KVSpec(bits=int(side[:-1]), axis="token", group_size=D, mode="int_block")
        for tag, axis in (("c", "channel"), ("t", "token")):
            if tag in side:
                bits, group = side.split(tag)
                return KVSpec(bits=int(bits), axis=axis, group_size=int(group))
        return KVSpec(bits=int(side), axis="token", group_size=D)

    k, v = name.split("/")
    return one(k), one(v)


def schedule_pairs() -> tuple[list[tuple[int, int]], dict, str]:
    """Per-layer (K bits, V bits) of the 3.25-bit schedule and its layout defaults (manifest JSON, else the preset)."""
    if os.path.exists(SCHEDULE):
        m = json.load(open(SCHEDULE))
        return [(x["k_bits"], x["v_bits"]) for x in m["layers"]], m["defaults"], SCHEDULE
    pairs, cur = [], {}
    for line in open(PRESET):
        line = line.strip()
        if line.startswith("nbits_key"):
            cur["k"] = int(line.split(":")[1])
        elif line.startswith("nbits_value"):
            pairs.append((cur["k"], int(line.split(":")[1])))
    defaults = dict(k_axis="channel", v_axis="token", k_group_size=32, v_group_size=32)
    return pairs, defaults, PRESET


def schedule_spec(kb: int, vb: int, defaults: dict) -> tuple[KVSpec, KVSpec]:
    def one(bits, side):
        return KVSpec(
            bits=bits,
            axis=defaults.get(f"{side}_axis", "token"),
            group_size=defaults.get(f"{side}_group_size", D),
            symmetric=defaults.get(f"{side}_symmetric", False),
            scale_dtype=defaults.get("scale_dtype", "float16"),
        )

    return one(kb, "k"), one(vb, "v")


def store_bytes_per_token(spec: KVSpec, page: int) -> float:
    return layout.bytes_per_page(spec, H, page, D) / page


def make_store(key, spec: KVSpec, pages: int, page: int):
    if spec.mode == "int_block":  # mode int's random pages, laid out as blocks
        from pallas_kernels.modes import int_block

        codes, scale, zero = make_store(key, int_block.as_int(spec), pages, page)
        return int_block.join(codes, scale, zero, spec, D), None, None
    codes_shape = layout.codes_shape(spec, H, pages, page, D)
    k1, k2, k3 = jax.random.split(key, 3)
    if not spec.quantized:
        return jax.random.normal(k1, codes_shape, jnp.bfloat16), None, None
    codes = jax.random.randint(k1, codes_shape, 0, 256, jnp.int32).astype(jnp.uint8)
    ss = layout.scale_shape(spec, H, pages, page, D)
    sdt = scale_dtype_of(spec.scale_dtype)
    # Scales shrink with the code range (x 15 / (2^bits - 1): 4-bit scales 0.02-0.3), so every bit width dequantizes
    # to keys and values of the same magnitude, as quantizing one model's cache would. With one scale range for all,
    # 8-bit keys were ~17x larger than 4-bit ones: scores spread over tens of nats, which no real model has and which
    # sent every split of the fixed softmax (a reference 18 bits wide where probabilities are f16) to its redo.
    lo, hi = (x * 15 / (2**spec.bits - 1) for x in (0.02, 0.3))
    scale = jax.random.uniform(k2, ss, jnp.float32, lo, hi).astype(sdt)
    zero = None if spec.symmetric else (jax.random.normal(k3, ss, jnp.float32)).astype(sdt)
    return codes, scale, zero


def page_tables(key, b: int, pages_per_seq: int, copies: int):
    """`copies` page tables [copies, B, pages_per_seq] over disjoint sets of a pool of copies*B*pages_per_seq pages."""
    n = copies * b * pages_per_seq
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    return perm.reshape(copies, b, pages_per_seq)


LOOPS = ("fori", "unrolled")


def harness(fn, args_list, reps: int, loop: str = "fori"):
    """(many, stacked) for `timed`: many(fixed, stacked) runs `reps` calls of fn and returns the float32 sum of each
    call's first output element (which keeps every call live)."""
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r}: expected one of {LOOPS}")
    n = len(args_list)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *args_list)

    def step(fx, a, acc):
        leaf = jax.tree.leaves(fn(fx, *a))[0]
        return acc + leaf.reshape(-1)[0].astype(jnp.float32)

    @jax.jit
    def many(fx, st):
        if loop == "fori":
            return jax.lax.fori_loop(0, reps, lambda i, acc: step(fx, jax.tree.map(lambda x: x[i % n], st), acc),
                                     jnp.float32(0))  # fmt: skip
        acc = jnp.float32(0)
        for i in range(reps):
            a, acc = jax.lax.optimization_barrier((jax.tree.map(lambda x, i=i: x[i % n], st), acc))
            acc = step(fx, a, acc)
        return acc

    return many, stacked


def timed(fn, fixed, args_list, reps: int, trials: int, trace: str | None = None, loop: str = "fori") -> float:
    """Median seconds per call of fn(fixed, *args) over `trials` executables that each run `reps` calls.

    Call i uses args_list[i % len(args_list)] (rotating inputs so that repeated calls do not hit L2); `fixed` (the
    pools) is passed as an argument, never closed over, so it is not baked into the executable. `loop`: "fori" runs
    the calls in a `fori_loop` (one body, its inputs sliced out per call); "unrolled" writes them out one after
    another in the executable, as a decode step's layers are, each call's inputs passed through an optimization
    barrier with the previous call's result (so XLA can neither merge equal calls nor reorder them). `trace`: a
    folder for a JAX profiler trace of one more (untimed) run of `reps` calls (`benchmarks/trace_summary.py --steps
    reps` sums its GPU kernels per call).
    """
    many, stacked = harness(fn, args_list, reps, loop)
    jax.block_until_ready(many(fixed, stacked))  # compile + warm up
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(many(fixed, stacked))
        ts.append((time.perf_counter() - t0) / reps)
    if trace:
        with jax.profiler.trace(trace):
            jax.block_until_ready(many(fixed, stacked))
    return float(np.median(ts))


def trace_folder(args, label: str, b: int, ctx: int) -> str | None:
    """Where `--trace_dir` puts one measurement's trace: a folder named by its config, tuning, batch and context."""
    if not args.trace_dir:
        return None
    return os.path.join(args.trace_dir, f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', label).strip('_')}_b{b}_{ctx}")


def copy_bandwidth(trials: int = 7, nbytes: int = 2 * 2**30) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) through jnp and, if present, torch."""
    res = {}
    x = jax.random.randint(jax.random.key(0), (nbytes // 4,), 0, 2**30, jnp.int32)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    res["jnp_elementwise_rw"] = 2 * nbytes / float(np.median(ts))
    del x
    try:
        import torch

        a = torch.randint(0, 2**30, (nbytes // 4,), dtype=torch.int32, device="cuda")
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(trials)]
        for s, e in ev:
            s.record()
            b.copy_(a)
            e.record()
        torch.cuda.synchronize()
        res["torch_copy_rw"] = 2 * nbytes / (float(np.median([s.elapsed_time(e) for s, e in ev])) / 1e3)
        a = a.float()  # a float32 sum: a read-only pass (an int32 sum in torch accumulates slowly in int64)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(trials)]
        for s, e in ev:
            s.record()
            a.sum()
            e.record()
        torch.cuda.synchronize()
        res["torch_sum_read"] = nbytes / (float(np.median([s.elapsed_time(e) for s, e in ev])) / 1e3)
        del a, b
        torch.cuda.empty_cache()
    except Exception as e:  # torch missing or no CUDA: the jnp figure stands alone
        res["torch_error"] = repr(e)[:200]
    return res


def check_small(k_spec: KVSpec, v_spec: KVSpec, page: int, kw: dict) -> float:
    """Relative error vs the reference at batch 3, context 8 pages or the tuning's `num_splits` if more (one sequence
    empty, one partial)."""
    key = jax.random.key(7)
    b, mp = 3, max(8, kw.get("num_splits") or 0)
    n = b * mp + 3
    ks = make_store(jax.random.fold_in(key, 1), k_spec, n, page)
    vs = make_store(jax.random.fold_in(key, 2), v_spec, n, page)
    q = jax.random.normal(jax.random.fold_in(key, 3), (b, HQ, 1, D), jnp.float32)
    pt = jax.random.permutation(jax.random.fold_in(key, 4), n)[: b * mp].reshape(b, mp).astype(jnp.int32)
    nt = jnp.asarray([0, mp * page, 3 * page], jnp.int32)
    pt = jnp.where(jnp.arange(mp)[None] < (nt // page)[:, None], pt, -1)
    args = (q, *ks, *vs, pt, nt)
    out, lse = paged_attention(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=D**-0.5, **kw)
    with jax.default_matmul_precision("highest"):  # XLA's default f32 matmul on GPU is TF32-like
        ref, ref_lse = paged_attention_reference(*args, k_spec=k_spec, v_spec=v_spec, sm_scale=D**-0.5)
    out, ref = np.asarray(out), np.asarray(ref)
    assert np.all(np.isfinite(out)), "non-finite output"
    assert np.all(out[0] == 0) and np.all(np.asarray(lse)[0] == -np.inf), "empty sequence not 0 / -inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def check_tolerance(tuning: dict) -> float:
    """Relative error a tuning must stay under against the reference: bf16 operands (2^-9 each) or ~16-bit splits."""
    return 1e-2 if tuning.get("precision") in ("bf16", "auto") or tuning.get("parts") == 1 else 1e-3


def tuning_label(config: str, tuning: dict, n_tunings: int) -> str:
    return config if n_tunings == 1 else f"{config}@{json.dumps(tuning, separators=(',', ':'))}"


def run_checks(todo: list[str], tunings: list[dict], check) -> tuple[dict, dict]:
    """check(config, tuning) -> relative error, for every pair. Returns (errors by label, failures by label): a
    tuning that raises (does not compile) or misses its tolerance is recorded and later not timed, instead of
    ending a run whose other tunings are fine."""
    errors, failed = {}, {}
    for c in todo:
        for t in tunings:  # every tuning computes the same function
            label = tuning_label(c, t, len(tunings))
            try:
                errors[label] = err = check(c, t)
            except Exception as e:
                failed[label] = f"check raised {e!r}"[:300]
                print(f"check {label}: {failed[label]}", flush=True)
                continue
            print(f"check {label}: rel err {err:.2e}", flush=True)
            if not err < check_tolerance(t):
                failed[label] = f"rel err {err:.2e} >= {check_tolerance(t):.0e}: does not match the reference"
    return errors, failed


def failed_check(config: str, tuning: dict, n_tunings: int, distinct, failed: dict) -> str | None:
    """Why (config, tuning) is not timed, or None: its check failed (for the schedule: any of its layer pairs')."""
    names = [f"sched{k}/{v}" for k, v in distinct] if config == "schedule" else [config]
    bad = [n for n in names if tuning_label(n, tuning, n_tunings) in failed]
    return f"failed its check ({', '.join(bad)})" if bad else None


def ab_summary(rows: list[dict], tunings: list[dict]) -> list[str]:
    """One line per (batch, context, config): each tuning's time and its ratio to the first tuning's."""
    lines, seen = [], {}
    for r in rows:
        if "base" in r:
            seen.setdefault((r["batch"], r["context"], r["base"]), {})[json.dumps(r["tuning"], sort_keys=True)] = r
    for (b, ctx, c), by in seen.items():
        first = by.get(json.dumps(tunings[0], sort_keys=True), {}).get("time_s")
        cells = []
        for t in tunings:
            r = by.get(json.dumps(t, sort_keys=True), {})
            if "time_s" not in r:
                cells.append(f"{json.dumps(t, separators=(',', ':'))}: {r.get('skipped') or r.get('error') or '-'}")
            else:
                ratio = f" (x{r['time_s'] / first:.3f})" if first else ""
                cells.append(f"{json.dumps(t, separators=(',', ':'))}: {r['time_s'] * 1e3:.3f}{ratio}")
        lines.append(f"B={b} ctx={ctx} {c}: " + "; ".join(cells))
    return lines


def bench_ours(b, ctx, k_spec, v_spec, page, kw, args, trace=None) -> dict:
    try:
        return _bench_ours(b, ctx, k_spec, v_spec, page, kw, args, trace)
    except Exception as e:  # a tuning that does not compile or fit: record it, keep sweeping
        return dict(error=repr(e)[:300])


def _bench_ours(b, ctx, k_spec, v_spec, page, kw, args, trace=None) -> dict:
    pps = ctx // page
    per_tok = store_bytes_per_token(k_spec, page) + store_bytes_per_token(v_spec, page)
    nbytes = b * ctx * per_tok + b * pps * 4 + b * HQ * D * 2
    copies = max(1, min(args.max_copies, math.ceil(3 * L2_BYTES / nbytes)))
    npages = copies * b * pps
    if npages * page * per_tok > args.mem_gb * 2**30:
        return dict(skipped=f"needs {npages * page * per_tok / 2**30:.1f} GB > --mem-gb {args.mem_gb}")
    key = jax.random.key(b * 7919 + ctx)
    ks = make_store(jax.random.fold_in(key, 1), k_spec, npages, page)
    vs = make_store(jax.random.fold_in(key, 2), v_spec, npages, page)
    tables = page_tables(jax.random.fold_in(key, 3), b, pps, copies)
    nt = jnp.full((b,), ctx, jnp.int32)
    qs = [jax.random.normal(jax.random.fold_in(key, 10 + i), (b, HQ, 1, D), jnp.bfloat16) for i in range(copies)]

    def fn(fx, q, pt):
        k, v = fx
        return paged_attention(q, *k, *v, pt, nt, k_spec=k_spec, v_spec=v_spec, sm_scale=D**-0.5, **kw)

    t = timed(fn, (ks, vs), [(qs[i], tables[i]) for i in range(copies)], args.reps, args.trials, trace, args.loop)
    del ks, vs
    return dict(time_s=t, bytes=nbytes, copies=copies)


def bench_jax_bf16(b, ctx, page, args) -> dict:
    """JAX's own Pallas (Triton) paged attention, bf16 pages, best of a few block settings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    pps = ctx // page
    nbytes = 2 * b * ctx * H * D * 2 + b * pps * 4 + b * HQ * D * 2
    copies = max(1, min(args.max_copies, math.ceil(3 * L2_BYTES / nbytes)))
    npages = copies * b * pps
    if 2 * npages * page * H * D * 2 > args.mem_gb * 2**30:
        return dict(skipped="does not fit --mem-gb")
    key = jax.random.key(b * 31 + ctx)
    kp = jax.random.normal(jax.random.fold_in(key, 1), (H, npages, page, D), jnp.bfloat16)
    vp = jax.random.normal(jax.random.fold_in(key, 2), (H, npages, page, D), jnp.bfloat16)
    tables = page_tables(jax.random.fold_in(key, 3), b, pps, copies)
    lengths = jnp.full((b,), ctx, jnp.int32)
    qs = [jax.random.normal(jax.random.fold_in(key, 10 + i), (b, HQ, D), jnp.bfloat16) for i in range(copies)]
    best, settings = None, []
    ppcbs, splitss = ([int(x) for x in part.split(",")] for part in args.jax_grid.split(":"))
    for ppcb in ppcbs:
        for splits in splitss:
            if pps % splits or (pps // splits) % min(ppcb, pps // splits):
                continue
            for warps in (4,):
                kw = dict(block_h=16, pages_per_compute_block=ppcb, k_splits=splits, num_warps=warps, num_stages=2)

                def fn(fx, q, pt, kw=kw):
                    return jpa.paged_attention(q, fx[0], fx[1], pt, lengths, **kw)

                try:
                    t = timed(
                        fn,
                        (kp, vp),
                        [(qs[i], tables[i]) for i in range(copies)],
                        args.reps,
                        args.trials,
                        loop=args.loop,
                    )
                except Exception as e:  # a setting the kernel rejects
                    settings.append(dict(kw=kw, error=repr(e)[:120]))
                    continue
                settings.append(dict(kw=kw, time_s=t))
                if best is None or t < best["time_s"]:
                    best = dict(time_s=t, kw=kw)
    del kp, vp
    return dict(**(best or {}), bytes=nbytes, settings=settings)


def bench_quantize_write(b, page, args) -> dict:
    """quantize_write(..., backend='gpu'): one decode step's B whole pages of K into one layer's pool. Modes `int`
    ('4', '2', '8': the Triton write kernel) and `int_block` ('4b', '2b': its own Triton write kernel,
    `pallas_kernels.modes.int_block_kernels`), as the dispatcher runs them; each setting of `--write-tunings` other
    than {} (e.g. {"rows": 16, "num_warps": 2}) calls the mode's kernel with it, keyed with its values."""
    from kvtuner_jax import modes
    from pallas_kernels.quantize_write import quantize_write

    out = {}
    for name, tw in itertools.product(("4", "2", "8", "4b", "2b"), json.loads(args.write_tunings)):
        spec = spec_pair(f"{name}/{name}")[0]
        setting = "".join(f"_{k}{v}" for k, v in sorted(tw.items()))
        key = f"k{name}_token_G{D}{'_int_block' if spec.mode == 'int_block' else ''}{setting}"
        write = (
            functools.partial(quantize_write, backend="gpu")
            if not tw
            else functools.partial(modes.mode_of(spec).write_kernel("gpu"), **tw)
        )
        try:
            out[key] = _time_write(
                write, spec, b, page, args, trace_folder(args, f"quantize_write_k{name}{setting}", b, page)
            )
        except Exception as e:  # one setting that cannot run (e.g. refused) does not lose the others
            out[key] = repr(e)[:200]
    return out


def _time_write(write, spec, b, page, args, trace) -> float:
    """Seconds a call of `write` takes (median of `args.trials` loops of `args.reps` calls), each call one step's
    `b` whole pages into one layer's pool."""
    n = 4096
    codes, scale, zero = make_store(jax.random.key(5), spec, n, page)
    pages = [jax.random.normal(jax.random.key(10 + i), (H, b, page, D), jnp.bfloat16) for i in range(4)]
    dests = [jax.random.permutation(jax.random.key(20 + i), n)[:b].astype(jnp.int32) for i in range(4)]

    @functools.partial(jax.jit, donate_argnums=(0,))
    def many(pool, pg, ds, spec=spec, write=write):
        def body(step, pool):
            c, s, z = pool
            return write(c, s, z, pg[step % 4], ds[step % 4], spec=spec)

        return jax.lax.fori_loop(0, args.reps, body, pool)

    pool = (codes, scale, zero)
    pg, ds = jnp.stack(pages), jnp.stack(dests)
    pool = jax.block_until_ready(many(pool, pg, ds))
    ts = []
    for _ in range(args.trials):
        t0 = time.perf_counter()
        pool = jax.block_until_ready(many(pool, pg, ds))
        ts.append((time.perf_counter() - t0) / args.reps)
    if trace:
        with jax.profiler.trace(trace):
            pool = jax.block_until_ready(many(pool, pg, ds))
    return float(np.median(ts))


def parser() -> argparse.ArgumentParser:
    """The command line; `benchmarks/tma_stream.py` takes its defaults for the timing helpers it shares."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="8,32,128")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--configs", default="16/16,8/8,4/4,4/2,2/2,schedule")
    ap.add_argument("--page", type=int, default=64, help="page size of our kernel")
    ap.add_argument("--jax-page", type=int, default=16, help="page size of JAX's bf16 kernel")
    ap.add_argument("--tuning", default="{}", help="JSON kwargs for our kernel (pages_per_block, num_splits, ...)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument(
        "--loop",
        default="fori",
        choices=LOOPS,
        help="timing harness: the calls in a fori_loop or written out (`timed`)",
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--max-copies", type=int, default=16)
    ap.add_argument("--mem-gb", type=float, default=60.0)
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument(
        "--jax-grid", default="4,8,16:4,8,16,32", help="JAX kernel settings tried: pages_per_compute_block:k_splits"
    )
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--quantize-write", action="store_true", help="also time quantize_write(backend='gpu')")
    ap.add_argument(
        "--write-tunings",
        default="[{}]",
        help='with --quantize-write: JSON list of write-kernel settings, e.g. [{}, {"rows": 16, "num_warps": 2}]',
    )
    ap.add_argument("--tunings", default=None, help="JSON list of tuning dicts: time every config under each")
    ap.add_argument("--once", default=None, help="run this config once at the first batch/context and exit (ncu)")
    ap.add_argument("--interpret", action="store_true", help="CPU dry run of this script (kernel in interpret mode)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument(
        "--trace_dir",
        default=None,
        help="also trace one more run of --reps calls per config (not the schedule; with --quantize-write, per "
        "write width too) here, a folder each; "
        "benchmarks/trace_summary.py DIR/<folder> --steps REPS sums its GPU kernels per call",
    )
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    kw = json.loads(args.tuning)
    if args.interpret:
        kw["interpret"] = True
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    configs = args.configs.split(",")
    tunings = [dict(kw, **t) for t in json.loads(args.tunings)] if args.tunings else [kw]

    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        smi = ""
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        device=smi or str(jax.devices()[0]),
        jax=jax.__version__,
        command=" ".join(sys.argv),
        tuning=kw,
        page=args.page,
        jax_page=args.jax_page,
    )
    print(meta, flush=True)
    if args.once:
        b, ctx, page = batches[0], contexts[0], args.page
        ks, vs = spec_pair(args.once)
        key = jax.random.key(0)
        pps = ctx // page
        k = make_store(jax.random.fold_in(key, 1), ks, b * pps, page)
        v = make_store(jax.random.fold_in(key, 2), vs, b * pps, page)
        pt = page_tables(jax.random.fold_in(key, 3), b, pps, 1)[0]
        q = jax.random.normal(key, (b, HQ, 1, D), jnp.bfloat16)
        nt = jnp.full((b,), ctx, jnp.int32)
        for _ in range(3):
            jax.block_until_ready(paged_attention(q, *k, *v, pt, nt, k_spec=ks, v_spec=vs, sm_scale=D**-0.5, **kw))
        return
    bw = copy_bandwidth(nbytes=2**24 if args.interpret else 2 * 2**30)
    best_bw = max(v for k, v in bw.items() if not k.endswith("error"))
    print("bandwidth", {k: (f"{v / 1e12:.3f} TB/s" if isinstance(v, float) else v) for k, v in bw.items()}, flush=True)

    pairs, defaults, source = schedule_pairs()
    distinct = sorted(set(pairs))
    rows = []
    checks, failed = {}, {}
    if not args.no_check:
        todo = [c for c in configs if c != "schedule"]
        if "schedule" in configs:  # each of its layer pairs
            todo += [f"sched{k}/{v}" for k, v in distinct]

        def check(c, t):
            ks, vs = schedule_spec(*map(int, c[5:].split("/")), defaults) if c.startswith("sched") else spec_pair(c)
            return check_small(ks, vs, args.page, t)

        checks, failed = run_checks(todo, tunings, check)

    for b in batches:
        for ctx in contexts:
            jres = dict(skipped="--no-jax") if args.no_jax else bench_jax_bf16(b, ctx, args.jax_page, args)
            jt = jres.get("time_s")
            rows.append(dict(batch=b, context=ctx, config="jax_bf16", **{k: v for k, v in jres.items()}))
            for c, kw in [(c, t) for t in tunings for c in configs]:
                label = tuning_label(c, kw, len(tunings))
                why = failed_check(c, kw, len(tunings), distinct, failed)
                if why:
                    rows.append(dict(batch=b, context=ctx, config=label, base=c, tuning=kw, skipped=why))
                    continue
                if c == "schedule":
                    total, total_bytes, per_pair = 0.0, 0.0, {}
                    for kb, vb in distinct:
                        ks, vs = schedule_spec(kb, vb, defaults)
                        r = bench_ours(b, ctx, ks, vs, args.page, kw, args)
                        if "time_s" not in r:
                            total = None
                            break
                        per_pair[f"{kb}/{vb}"] = r["time_s"]
                        n = pairs.count((kb, vb))
                        total += n * r["time_s"]
                        total_bytes += n * r["bytes"]
                    if total is None:
                        rows.append(dict(batch=b, context=ctx, config=label, **r))
                        continue
                    r = dict(time_s=total / len(pairs), bytes=total_bytes / len(pairs), per_pair=per_pair)
                    r["note"] = f"mean per layer over {len(pairs)} layers of {source}"
                else:
                    ks, vs = spec_pair(c)
                    r = bench_ours(b, ctx, ks, vs, args.page, kw, args, trace_folder(args, label, b, ctx))
                if "time_s" in r:
                    r["gbps"] = r["bytes"] / r["time_s"] / 1e9
                    r["pct_bw"] = 100 * r["bytes"] / r["time_s"] / best_bw
                    r["floor_s"] = r["bytes"] / best_bw
                    if jt:
                        r["speedup_vs_jax_bf16"] = jt / r["time_s"]
                rows.append(dict(batch=b, context=ctx, config=label, base=c, tuning=kw, **r))
                print(rows[-1], flush=True)
            if jt:
                jrow = [r for r in rows if r["config"] == "jax_bf16"][-1]
                jrow["gbps"] = jres["bytes"] / jt / 1e9
                jrow["pct_bw"] = 100 * jres["bytes"] / jt / best_bw

    qw = None
    if args.quantize_write:
        try:
            qw = bench_quantize_write(32, args.page, args)
        except Exception as e:
            qw = dict(error=repr(e)[:300])
        print("quantize_write per decode step (B=32 pages, one layer's K):", qw, flush=True)

    result = dict(
        meta=meta, bandwidth=bw, best_bandwidth=best_bw, checks=checks, failed_checks=failed, rows=rows,
        quantize_write=qw,
    )  # fmt: skip
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    keys = ["batch", "context", "config", "time_s", "gbps", "pct_bw", "floor_s", "speedup_vs_jax_bf16", "skipped"]
    with open(os.path.join(args.out, "attention.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"\nbest copy bandwidth {best_bw / 1e12:.3f} TB/s (read+write); device {meta['device']}")
    print(f"{'B':>4} {'ctx':>6} {'config':>9} {'ms':>8} {'GB/s':>7} {'%bw':>5} {'floor':>7} {'xJAX':>6}")
    for r in rows:
        if "time_s" not in r:
            print(f"{r['batch']:>4} {r['context']:>6} {r['config']:>9}  skipped: {r.get('skipped', r.get('error'))}")
            continue
        print(
            f"{r['batch']:>4} {r['context']:>6} {r['config']:>9} {r['time_s'] * 1e3:8.3f} {r.get('gbps', 0):7.0f}"
            f" {r.get('pct_bw', 0):5.1f} {r.get('floor_s', 0) * 1e3:7.3f} {r.get('speedup_vs_jax_bf16', 0):6.2f}"
        )
    if len(tunings) > 1:
        print("\nA/B: ms per tuning (x the first tuning's time)")
        for line in ab_summary(rows, tunings):
            print(line)


if __name__ == "__main__":
    main()
