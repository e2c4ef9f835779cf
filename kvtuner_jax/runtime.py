"""The jitted model step over the paged cache, and a simple static-batch generator built on it.

`ModelRunner.step` is the one compiled unit every higher layer drives (the engine's scheduler, the benchmarks,
`run_inference.py`): tokens of B rows (decode: T = 1; prefill chunk: T > 1) in, the logits of each row's last valid
token out, the cache donated and returned. Shapes are bucketed (T to a power of two, B and the page-table width
fixed per runner) so steady-state steps never recompile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import cache as kc
from kvtuner_jax.errors import CacheError
from kvtuner_jax.model import ModelConfig, Params, forward
from kvtuner_jax.page_table import SequencePages, pages_needed, table_rows
from kvtuner_jax.specs import LayerSpec


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))


def _step(params, cache, tokens, batch, *, cfg: ModelConfig, attention, all_logits: bool):
    t = tokens.shape[1]
    positions = batch.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    logits, (cache, _) = forward(params, cfg, tokens, positions, attention, (cache, batch))
    if all_logits:
        return logits, cache
    last = jnp.clip(batch.num_new - 1, 0, t - 1)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], cache  # [B, V]


@dataclasses.dataclass
class ModelRunner:
    """Model + manifest + cache sizes -> a compiled step. `backend` is the kernel choice ("auto", "reference", ...).

    mesh: optional ("data", "model") mesh (`kvtuner_jax.sharding`). With it, the params are rewritten by the KV-head
    plan (replicated / zero-padded heads so every model shard owns whole KV heads) and placed Megatron-style, the
    cache is allocated sharded (heads on "model", pages and slots on "data"), the batch rows are split over "data",
    and the logits come back replicated on every device (every process can read them). `cache_cfg` stays the
    logical config the caller gave; `sharded_cache_cfg` is what is allocated (H' heads).
    """

    cfg: ModelConfig
    params: Params
    specs: tuple[LayerSpec, ...]
    cache_cfg: kc.CacheConfig
    backend: str = "auto"
    interpret: bool = False
    compiles: int = 0  # number of distinct step signatures compiled (a test asserts steady state adds none)
    mesh: jax.sharding.Mesh | None = None
    precision: str = "high"  # paged-attention operands: "high", "bf16" or "auto" (pallas_kernels.paged_attention)

    def __post_init__(self):
        if len(self.specs) != self.cfg.num_layers:
            raise CacheError(f"manifest has {len(self.specs)} layers, model {self.cfg.name} has {self.cfg.num_layers}")
        self._seen: set = set()
        self.min_residual = min(s.residual_length for s in self.specs)
        if self.mesh is not None:
            self._init_sharded()
            return
        self.run_cfg, self.run_params, self.sharded_cache_cfg = self.cfg, self.params, self.cache_cfg
        attention = kc.PagedAttention(backend=self.backend, interpret=self.interpret, precision=self.precision)
        self._fns = {}
        for all_logits in (False, True):
            self._fns[all_logits] = jax.jit(
                partial(_step, cfg=self.cfg, attention=attention, all_logits=all_logits), donate_argnums=(1,)
            )

    def _init_sharded(self):
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from kvtuner_jax import sharding as sh

        data, model = sh.mesh_sizes(self.mesh)
        cc = self.cache_cfg
        sh.check_divisible("num_pages", cc.num_pages, data)
        sh.check_divisible("max_seqs", cc.max_seqs, data)
        self.head_plan, self.run_cfg, self.run_params = sh.shard_params(self.params, self.cfg, self.mesh)
        self.sharded_cache_cfg = dataclasses.replace(cc, num_kv_heads=self.head_plan.kv_heads)
        self._param_sh = sh.named(self.mesh, sh.param_specs(self.run_cfg, model))
        abstract = jax.eval_shape(lambda: kc.init_cache(self.specs, self.sharded_cache_cfg))
        self._cache_sh = sh.named(self.mesh, sh.cache_specs(abstract))
        self._batch_sh = sh.named(self.mesh, sh.batch_specs())
        self._tok_sh = NamedSharding(self.mesh, P("data", None))
        self._out_sh = NamedSharding(self.mesh, P())  # logits replicated: every process reads them locally
        attention = kc.PagedAttention(
            backend=self.backend, interpret=self.interpret, mesh=self.mesh, precision=self.precision
        )
        self._fns = {}
        for all_logits in (False, True):
            self._fns[all_logits] = jax.jit(
                partial(_step, cfg=self.run_cfg, attention=attention, all_logits=all_logits),
                in_shardings=(self._param_sh, self._cache_sh, self._tok_sh, self._batch_sh),
                out_shardings=(self._out_sh, self._cache_sh),
                donate_argnums=(1,),
            )

    @property
    def page_size(self) -> int:
        return self.cache_cfg.page_size

    @property
    def data_shards(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["data"])

    def init_cache(self) -> kc.KVCache:
        if self.mesh is None:
            return kc.init_cache(self.specs, self.cache_cfg)
        # Allocated in place with its sharding: each device creates only its own shard.
        return jax.jit(lambda: kc.init_cache(self.specs, self.sharded_cache_cfg), out_shardings=self._cache_sh)()

    def step(self, cache: kc.KVCache, tokens, batch: kc.BatchInfo, all_logits: bool = False):
        """tokens [B, T] int32 -> (logits [B, V] of each row's last new token, or [B, T, V] if all_logits; cache).

        With a mesh, B must divide over the data axis and every live row's pages and slot must belong to its data
        shard (`sharding.check_batch_placement`); tokens and batch may be host arrays given alike on every process.
        """
        sig = (tuple(np.shape(tokens)), tuple(batch.page_table.shape), all_logits)
        if sig not in self._seen:
            self._seen.add(sig)
            self.compiles += 1
        if self.mesh is None:
            return self._fns[all_logits](self.params, cache, jnp.asarray(tokens, jnp.int32), batch)
        return self._sharded_step(cache, tokens, batch, all_logits)

    def _sharded_step(self, cache, tokens, batch, all_logits):
        from kvtuner_jax import sharding as sh

        cc = self.cache_cfg
        host = [np.asarray(x) for x in (batch.page_table, batch.lengths, batch.num_new, batch.slots)]
        sh.check_divisible("batch rows", host[0].shape[0], self.data_shards)
        sh.check_batch_placement(host[0], host[3], host[2], cc.num_pages, cc.max_seqs, self.data_shards)
        gbatch = kc.BatchInfo(*(sh.put_global(x, s) for x, s in zip(host, self._batch_sh_fields(), strict=True)))
        gtok = sh.put_global(np.asarray(tokens, np.int32), self._tok_sh)
        logits, cache = self._fns[all_logits](self.run_params, cache, gtok, gbatch)
        if jax.process_count() > 1:
            # A process-local copy, so host code (samplers, the engine) can mix it with its own local arrays.
            logits = jnp.asarray(np.asarray(logits))
        return logits, cache

    def _batch_sh_fields(self):
        b = self._batch_sh
        return (b.page_table, b.lengths, b.num_new, b.slots)

    def pages_for(self, length: int) -> int:
        return pages_needed(length, self.min_residual, self.page_size)


def make_batch(
    seqs: Sequence[SequencePages | None],
    num_new: Sequence[int],
    max_pages: int,
    as_numpy: bool = False,
    table: np.ndarray | None = None,
) -> kc.BatchInfo:
    """Batch info for rows of live sequences (None = padding row): device arrays, or host numpy with `as_numpy`
    (what a sharded runner wants: it checks placement on the host and transfers each shard once). `table`: the page
    table rows if the caller keeps them (`table_rows(seqs, max_pages)` otherwise); it must not change afterwards."""
    conv = np.asarray if as_numpy else jnp.asarray
    if table is None:
        table = table_rows(list(seqs), max_pages)
    elif table.shape != (len(seqs), max_pages):
        raise CacheError(f"page table of shape {table.shape}, expected {(len(seqs), max_pages)}")
    return kc.BatchInfo(
        page_table=conv(table),
        lengths=conv(np.array([0 if s is None else s.length for s in seqs], np.int32)),
        num_new=conv(np.array(num_new, np.int32)),
        slots=conv(np.array([-1 if s is None else s.slot for s in seqs], np.int32)),
    )
