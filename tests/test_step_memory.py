"""Device memory of the compiled engine step: the cache is updated in place, with no pool-sized temporaries.

The oracle is XLA's own buffer assignment (`compiled.memory_analysis()`), at two pool sizes: every cache array must be
aliased input -> output (donated), and the temporaries must not grow with the pool. Before the fix the step held a
copy of every pool (XLA protected the paged-attention read from the in-place write), which ran an 80 GB H100 out of
memory with the pool sized to the free memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from kvtuner_jax import model
from kvtuner_jax.cache import BatchInfo
from kvtuner_jax.engine import Engine
from kvtuner_jax.specs import KVSpec, LayerSpec

CFG = dataclasses.replace(model.tiny_config("bfloat16"), head_dim=64, max_position_embeddings=1 << 16)
# 16-bit layers and KIVI-style quantized layers (per-channel keys, residual tail)
SPECS = tuple(
    LayerSpec(KVSpec(4, axis="channel", group_size=32), KVSpec(2, group_size=32), residual_length=32)
    if i % 2
    else LayerSpec(KVSpec(16), KVSpec(16), residual_length=0)
    for i in range(CFG.num_layers)
)


def _step_memory(pages: int, chunk: int):
    params = model.init_random_params(CFG, jax.random.key(0))
    eng = Engine(CFG, params, SPECS, max_seqs=4, max_seq_len=4096, page_size=32, num_pages=pages, backend="reference")
    cache = eng.cache
    b = 4
    batch = BatchInfo(
        page_table=jnp.zeros((b, eng.max_pages_per_seq), jnp.int32),
        lengths=jnp.full((b,), 100, jnp.int32),
        num_new=jnp.full((b,), chunk, jnp.int32),
        slots=jnp.arange(b, dtype=jnp.int32),
    )
    tokens = jnp.zeros((b, chunk), jnp.int32)
    runner = eng.runner
    compiled = runner._fns[False].lower(runner.run_params, cache, tokens, batch).compile()
    return sum(x.nbytes for x in jax.tree.leaves(cache)), compiled.memory_analysis()


@pytest.mark.parametrize("chunk", [1, 8], ids=["decode", "prefill-chunk"])
def test_step_updates_the_cache_in_place_without_pool_sized_temporaries(chunk):
    small_pool, small = _step_memory(1024, chunk)
    big_pool, big = _step_memory(4096, chunk)
    assert small.alias_size_in_bytes == small_pool and big.alias_size_in_bytes == big_pool  # every array donated
    grew = big.temp_size_in_bytes - small.temp_size_in_bytes
    assert grew < 0.05 * (big_pool - small_pool), (grew, big_pool - small_pool)
