"""Device memory of the benchmark-only cache refill (`Engine.fill_random`): it must rewrite each layer in place.

Oracle: XLA's buffer assignment of the compiled per-layer refill. Its output depends only on the layer's shapes, so
without `keep_unused` jit pruned the donated layer from the computation: nothing was aliased, and every call held a
fresh layer next to the old one (one pool array of 600-800 MiB is what the H100 full-memory runs failed to allocate).
The step itself is covered by tests/test_step_memory.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import engine, model
from kvtuner_jax.engine import Engine
from kvtuner_jax.specs import KVSpec, LayerSpec

CFG = model.tiny_config("bfloat16")
# a 16-bit layer and a KIVI-style one (per-channel 4-bit keys, per-token 2-bit values, residual tail)
SPECS = (
    LayerSpec(KVSpec(16), KVSpec(16), residual_length=0),
    LayerSpec(KVSpec(4, axis="channel", group_size=16), KVSpec(2, group_size=16), residual_length=16),
) * (CFG.num_layers // 2)


def test_fill_random_rewrites_every_layer_in_place_without_temporaries():
    params = model.init_random_params(CFG, jax.random.key(0))
    eng = Engine(CFG, params, SPECS, max_seqs=2, max_seq_len=512, page_size=16, num_pages=64, backend="reference")
    for layer in eng.cache.layers[:2]:
        ma = engine._randomize_layer.lower(layer, jnp.uint32(3)).compile().memory_analysis()
        nbytes = sum(x.nbytes for x in jax.tree.leaves(layer))
        assert ma.alias_size_in_bytes == nbytes  # every leaf donated and written in place
        assert ma.temp_size_in_bytes < 0.05 * nbytes, (ma.temp_size_in_bytes, nbytes)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(eng.cache)]
    eng.fill_random(2, 100)
    after = jax.tree.leaves(eng.cache)
    # the refill really wrote data (a test that could pass on an untouched cache would prove nothing)
    assert all(not np.array_equal(b, np.asarray(a)) for b, a in zip(before, after, strict=True))
