"""One process of tests/test_multiprocess.py: greedy generation on a tiny random model, optionally multi-host.

    python tests/_mp_worker.py OUT.json                                  # one process, one device, no mesh
    python tests/_mp_worker.py OUT.json --mesh data=2,model=2 --coordinator_address 127.0.0.1:PORT \
        --num_processes 2 --process_id I                                  # one of two processes (2 CPU devices each)

The parent sets XLA_FLAGS (device count) and JAX_PLATFORMS=cpu. Every process writes what it generated; the
parent checks that process 0 and process 1 agree with each other and with the single-process run.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags

from kvtuner_jax import sharding

sharding.define_mesh_flags()
FLAGS = flags.FLAGS

# The model and manifest: 3 KV heads (SmolLM2's count), so a model axis of 2 pads KV heads to 4; a mixed manifest.
PROMPTS = [[5, 17, 33, 2 + 9, 40, 41, 7, 8, 9, 60, 61, 3, 4, 5, 6, 7, 70, 71, 72], [9, 10, 11, 12, 13], [20] * 23]
MAX_NEW = 6


def main(argv):
    out_path = argv[1]
    sharding.init_distributed_from_flags()  # before any other JAX call
    import jax
    import numpy as np

    from kvtuner_jax import model
    from kvtuner_jax.engine import Engine
    from kvtuner_jax.sampling import SamplingParams
    from kvtuner_jax.specs import KVSpec, LayerSpec

    cfg = dataclasses.replace(model.tiny_config(), num_heads=6, num_kv_heads=3)
    params = model.init_random_params(cfg, jax.random.key(0))  # same key on every process: same weights
    specs = (
        LayerSpec(KVSpec(4, axis="channel", group_size=8), KVSpec(2, group_size=16), residual_length=4),
        LayerSpec(KVSpec(8, symmetric=True, group_size=16), KVSpec(16), residual_length=0),
    )
    mesh = sharding.mesh_from_flag(FLAGS.mesh)
    engine = Engine(cfg, params, specs, mesh, max_seqs=4, max_seq_len=64, page_size=8, num_pages=16,
                    cache_dtype="float32", backend="reference", eos_ids=())  # fmt: skip
    runner = engine.runner
    tokens = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    info = {
        "tokens": tokens,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mesh": None if mesh is None else dict(mesh.shape),
        "kv_heads": runner.sharded_cache_cfg.num_kv_heads,
        "checksum": float(np.float64(sum(map(sum, tokens)))),
    }
    with open(out_path, "w") as f:
        json.dump(info, f)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
