"""The jitted model step over the paged cache, and a simple static-batch generator built on it.

`ModelRunner.step` is the one compiled unit every higher layer drives (the engine's scheduler, the benchmarks,
`run_inference.py`): tokens of B rows (decode: T = 1; prefill chunk: T > 1) in, the logits of each row's last valid
token out, the cache donated and returned. Shapes are bucketed (T to a power of two, B and the page-table width
fixed per runner) so steady-state steps never recompile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import cache as kc
from kvtuner_jax.errors import CacheError
from kvtuner_jax.model import ModelConfig, Params, forward
from kvtuner_jax.page_table import PageAllocator, SequencePages, pages_needed, table_rows
from kvtuner_jax.sampling import SamplingParams, sample
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
    """Model + manifest + cache sizes -> a compiled step. `backend` is the kernel choice ("auto", "reference", ...)."""

    cfg: ModelConfig
    params: Params
    specs: tuple[LayerSpec, ...]
    cache_cfg: kc.CacheConfig
    backend: str = "auto"
    interpret: bool = False
    compiles: int = 0  # number of distinct step signatures compiled (a test asserts steady state adds none)

    def __post_init__(self):
        if len(self.specs) != self.cfg.num_layers:
            raise CacheError(f"manifest has {len(self.specs)} layers, model {self.cfg.name} has {self.cfg.num_layers}")
        attention = kc.PagedAttention(backend=self.backend, interpret=self.interpret)
        self._fns = {}
        for all_logits in (False, True):
            self._fns[all_logits] = jax.jit(
                partial(_step, cfg=self.cfg, attention=attention, all_logits=all_logits), donate_argnums=(1,)
            )
        self._seen: set = set()
        self.min_residual = min(s.residual_length for s in self.specs)

    @property
    def page_size(self) -> int:
        return self.cache_cfg.page_size

    def init_cache(self) -> kc.KVCache:
        return kc.init_cache(self.specs, self.cache_cfg)

    def step(self, cache: kc.KVCache, tokens, batch: kc.BatchInfo, all_logits: bool = False):
        """tokens [B, T] int32 -> (logits [B, V] of each row's last new token, or [B, T, V] if all_logits; cache)."""
        sig = (tuple(np.shape(tokens)), tuple(batch.page_table.shape), all_logits)
        if sig not in self._seen:
            self._seen.add(sig)
            self.compiles += 1
        return self._fns[all_logits](self.params, cache, jnp.asarray(tokens, jnp.int32), batch)

    def pages_for(self, length: int) -> int:
        return pages_needed(length, self.min_residual, self.page_size)


def make_batch(seqs: Sequence[SequencePages | None], num_new: Sequence[int], max_pages: int) -> kc.BatchInfo:
    """Device batch info for rows of live sequences (None = padding row)."""
    return kc.BatchInfo(
        page_table=jnp.asarray(table_rows(list(seqs), max_pages)),
        lengths=jnp.asarray(np.array([0 if s is None else s.length for s in seqs], np.int32)),
        num_new=jnp.asarray(np.array(num_new, np.int32)),
        slots=jnp.asarray(np.array([-1 if s is None else s.slot for s in seqs], np.int32)),
    )


def generate(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    eos_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Static-batch generation: one prefill step for all prompts, then decode steps until every row stops.

    Raises CacheError before any compute when a prompt plus max_new_tokens cannot fit the cache.
    """
    b = len(prompts)
    cc = runner.cache_cfg
    if b == 0:
        return []
    if b > cc.max_seqs:
        raise CacheError(f"{b} prompts but the cache has {cc.max_seqs} sequence slots (max_seqs)")
    total_need = 0
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise CacheError(f"prompt {i} is empty")
        need = runner.pages_for(len(p) + sampling.max_new_tokens)
        total_need += need
        if need > cc.num_pages:
            raise CacheError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={sampling.max_new_tokens} it needs {need} pages "
                f"of {cc.page_size} tokens but the cache holds {cc.num_pages} pages in all"
            )
    if total_need > cc.num_pages:
        raise CacheError(f"the {b} prompts need {total_need} pages together; the cache holds {cc.num_pages}")
    # Table width: enough for the longest request, bucketed; the reference path reads every listed page.
    max_pages = bucket(max(runner.pages_for(len(p) + sampling.max_new_tokens) for p in prompts))
    alloc = PageAllocator(cc.num_pages)
    seqs = [SequencePages(slot=i) for i in range(b)]
    cache = runner.init_cache()
    keys = jax.random.split(jax.random.key(sampling.seed), b)
    temp = jnp.full((b,), sampling.temperature, jnp.float32)
    top_k = jnp.full((b,), sampling.top_k, jnp.int32)
    top_p = jnp.full((b,), sampling.top_p, jnp.float32)
    sampler = jax.jit(sample)
    fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))

    t = bucket(max(len(p) for p in prompts), 16)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    num_new = [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in range(b)]
    done = [sampling.max_new_tokens == 0] * b
    step_no = 0
    while not all(done):
        for s, n in zip(seqs, num_new, strict=True):
            s.pages += alloc.allocate(runner.pages_for(s.length + n) - len(s.pages))
        batch = make_batch(seqs, num_new, max_pages)
        logits, cache = runner.step(cache, tokens, batch)
        step_keys = fold(keys, step_no)
        nxt = np.asarray(sampler(logits, step_keys, temp, top_k, top_p))
        for i, s in enumerate(seqs):
            s.length += num_new[i]
        tokens = np.zeros((b, 1), np.int32)
        num_new = [0] * b
        for i in range(b):
            if done[i]:
                continue
            tok = int(nxt[i])
            out[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok in eos_ids or len(out[i]) >= sampling.max_new_tokens:
                done[i] = True
            else:
                tokens[i, 0] = tok
                num_new[i] = 1
        step_no += 1
    return out
