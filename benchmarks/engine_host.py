"""Host time of one engine decode step: the engine's own bookkeeping (admission, scheduling, page tables, sampling
hand-off, outputs) with the model and the sampler replaced by instant stand-ins, so no device work is timed.

Every engine step waits for its sampled tokens, so this time is time the accelerator sits idle between steps.
CPU-only; e.g. `python benchmarks/engine_host.py --batch 102 --context 16384 --manifest kvtuner3.25`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

import kvtuner_jax.engine as engine_mod  # noqa: E402
from kvtuner_jax.sampling import SamplingParams  # noqa: E402


def host_ms_per_step(batch: int, context: int, manifest: str, steps: int, page_size: int = 32) -> dict:
    cfg = e2e.model_config("tiny")
    man = e2e.build_manifest(manifest, cfg, "kivi")
    eng = e2e.decode_engine(cfg, None, man, batch, context + steps + 6, page_size)
    eng.fill_random(batch, context, seed=0, sampling=SamplingParams(max_new_tokens=steps + 4))
    jax.block_until_ready(eng.cache)  # the pools' random fill runs on the CPU's threads: let it finish first
    logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    tokens = np.zeros(batch, np.int32)
    eng.runner.step = lambda cache, toks, b, all_logits=False: (logits, cache)
    greedy, engine_mod._greedy = engine_mod._greedy, lambda lg: tokens
    try:
        for _ in range(2):
            eng.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            outs = eng.step()
        dt = (time.perf_counter() - t0) / steps
    finally:
        engine_mod._greedy = greedy
    assert len(outs) == batch
    return {"batch": batch, "context": context, "manifest": manifest, "host_ms_per_step": 1e3 * dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[27, 102])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--manifest", default="kvtuner3.25", help="16/16, 8/8, 4/4, 2/2 or kvtuner3.25")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    for b in args.batch:
        print(host_ms_per_step(b, args.context, args.manifest, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
