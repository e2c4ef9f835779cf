"""Tensor parallelism on real GPUs: TP=n equals TP=1 in outputs, and decode tokens/s of an 8B-shaped model.

    PYTHONPATH=. python3 benchmarks/tp.py --out /tmp/tp.json          # on a machine with >= 2 GPUs

Part 1 (correctness) reruns the sharding tests' tiny models (4 and 3 KV heads, mixed 2/4/8/16-bit manifest) on one
device and on meshes data=1 x model=n and data=n x model=1, with the reference path and the compiled GPU kernels, and
prints whether the greedy tokens match and the largest logit difference.
Part 2 (speed): Llama-3.1-8B shapes, random bf16 weights, the upstream KVTuner 3.25-bit schedule, a batch of prompts
prefilled in one step, then decode steps timed (device-synchronized, median) at model=1 and model=n.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("KVTUNER_SHARDING_CHILD", "1")

from kvtuner_jax import cache as kc  # noqa: E402
from kvtuner_jax import manifest as mf  # noqa: E402
from kvtuner_jax import model  # noqa: E402
from kvtuner_jax import sharding as sh  # noqa: E402
from kvtuner_jax.page_table import SequencePages  # noqa: E402
from kvtuner_jax.runtime import ModelRunner, make_batch  # noqa: E402

SCHEDULE = Path(__file__).resolve().parent.parent / "configs" / "llama31_8b_kvtuner_3.25bit.json"


def correctness(n: int) -> list[dict]:
    import test_sharding as T

    rows = []
    for name in ("kv4", "kv3"):
        for backend in ("reference", "gpu"):
            want_l, want_t = T.one_device(name, backend)
            for d, m in ((1, n), (n, 1)):
                r = T._runner(name, sh.make_mesh(d, m), backend)
                got_l, got_t = T.run_greedy(r, name)
                diff = max(float(np.abs(a - b).max()) for a, b in zip(got_l, want_l, strict=True))
                row = dict(
                    model=name,
                    backend=backend,
                    data=d,
                    model_shards=m,
                    rule=r.head_plan.rule,
                    tokens_equal=got_t == want_t,
                    max_logit_diff=diff,
                )
                print(row, flush=True)
                rows.append(row)
    return rows


def decode_speed(model_shards: int, batch: int, prompt: int, steps: int, backend: str, tiny: bool = False) -> dict:
    if tiny:  # CPU smoke test of this script
        cfg = dataclasses.replace(model.tiny_config("bfloat16"), num_kv_heads=4, head_dim=32)
        man = mf.uniform(mf.ModelIdentity(cfg.name, cfg.num_layers, 4, 32), 4, 2, k_group_size=32, v_group_size=32)
    else:
        cfg = dataclasses.replace(model.llama31_8b_config("bfloat16"), name="Meta-Llama-3.1-8B-Instruct")
        man = mf.load(SCHEDULE)
    params = model.init_random_params(cfg, jax.random.key(0))
    page = 32
    per_seq = (prompt + steps + page - 1) // page + 1
    cc = kc.CacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page, batch * per_seq, batch, "bfloat16")
    mesh = None if model_shards == 1 else sh.make_mesh(1, model_shards)
    runner = ModelRunner(cfg, params, man.layer_specs(), cc, backend=backend, mesh=mesh)
    del params
    cache = runner.init_cache()
    seqs = [SequencePages(slot=i, pages=list(range(i * per_seq, (i + 1) * per_seq))) for i in range(batch)]
    rng = np.random.default_rng(0)
    toks = rng.integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    logits, cache = runner.step(cache, toks, make_batch(seqs, [prompt] * batch, per_seq, as_numpy=mesh is not None))
    for s in seqs:
        s.length = prompt
    times = []
    for i in range(steps):
        nxt = np.asarray(jax.device_get(logits)).argmax(-1).astype(np.int32)[:, None]
        t0 = time.perf_counter()
        logits, cache = runner.step(cache, nxt, make_batch(seqs, [1] * batch, per_seq, as_numpy=mesh is not None))
        jax.block_until_ready(logits)
        if i >= 3:  # the first steps compile
            times.append(time.perf_counter() - t0)
        for s in seqs:
            s.length += 1
    med = float(np.median(times))
    row = dict(
        model_shards=model_shards,
        batch=batch,
        context=prompt,
        backend=backend,
        step_ms=med * 1e3,
        tokens_per_s=batch / med,
        manifest=man.metadata.get("source", "uniform") if tiny is False else "tiny K4V2",
    )
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--skip_correctness", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny model instead of the 8B shape (CPU smoke test)")
    a = ap.parse_args()
    n = jax.device_count()
    print(f"devices: {n} x {jax.devices()[0].device_kind}", flush=True)
    res = {"devices": n, "device_kind": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d")}
    if not a.skip_correctness:
        res["correctness"] = correctness(n)
    res["speed"] = []
    for m in sorted({1, n}):
        try:
            res["speed"].append(decode_speed(m, a.batch, a.prompt, a.steps, "auto", a.tiny))
        except Exception as e:  # report and go on: the other mesh size still gets measured
            print(f"model={m}: {type(e).__name__}: {e}", flush=True)
            res["speed"].append(dict(model_shards=m, error=f"{type(e).__name__}: {e}"[:500]))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
