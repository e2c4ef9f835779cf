"""XLA's buffer assignment for one compiled engine step: argument, output, aliased (donated) and temporary bytes.

A step must update the cache in place: aliased bytes equal the cache and temporaries stay small and independent of
the pool size (tests/test_step_memory.py checks this on CPU; this script shows it for the real kernels on a GPU).

    PYTHONPATH=. python3 benchmarks/step_memory.py --shape llama31_8b --manifest kvtuner3.25 --kv_budget_gb 8
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp

from benchmarks.e2e import build_manifest, model_config
from kvtuner_jax import model
from kvtuner_jax.cache import BatchInfo
from kvtuner_jax.engine import Engine
from pallas_kernels.paged_attention import PRECISIONS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama31_8b")
    p.add_argument("--manifest", default="16/16")
    p.add_argument("--kv_budget_gb", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = p.parse_args(argv)
    cfg = model_config(args.shape)
    params = jax.eval_shape(lambda: model.init_random_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    m = build_manifest(args.manifest, cfg, "kivi")
    eng = Engine(cfg, params, m, max_seqs=args.batch, max_seq_len=4096, page_size=32,
                 kv_cache_gb=args.kv_budget_gb, backend=args.backend, precision=args.precision)  # fmt: skip
    b = args.batch
    batch = BatchInfo(
        page_table=jnp.zeros((b, eng.max_pages_per_seq), jnp.int32),
        lengths=jnp.full((b,), 1000, jnp.int32),
        num_new=jnp.ones((b,), jnp.int32),
        slots=jnp.arange(b, dtype=jnp.int32),
    )
    runner = eng.runner
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = runner._fns[False].lower(runner.run_params, eng.cache, jnp.zeros((b, 1), jnp.int32), batch).compile()
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(eng.cache))
    ma = compiled.memory_analysis()
    gib = 2**30
    print(f"{args.manifest} on {jax.devices()[0]}: cache {cache_bytes / gib:.2f} GiB; argument "
          f"{ma.argument_size_in_bytes / gib:.2f}, output {ma.output_size_in_bytes / gib:.2f}, aliased "
          f"{ma.alias_size_in_bytes / gib:.2f}, temporaries {ma.temp_size_in_bytes / gib:.3f} GiB")  # fmt: skip
    for w in caught:
        print("warning:", str(w.message)[:300])


if __name__ == "__main__":
    main()
