"""Continuous-batching inference engine over the paged mixed-precision KV cache.

A library API first; `run_inference.py`, the eval job and the benchmarks drive it, and so can a serving stack:

    eng = Engine(cfg, params, manifest, max_seqs=8, num_pages=512)
    outs = eng.generate([prompt_ids, ...], SamplingParams(max_new_tokens=32))      # batch API
    req = eng.add_request(prompt_ids, sampling, on_output=print)                     # step API
    while eng.has_unfinished():
        for out in eng.step(): ...                                                   # StepOutput per new token

Scheduling (one `step()`):
1. Admission, first come first served: a waiting request joins when a sequence slot is free and the free pages cover
   its tokens so far plus one (after what running requests need for their next step). A request that can never fit
   (longer than `max_seq_len`, or more pages than the whole pool) is rejected at `add_request` with a reason.
2. Every running request gets work: a decoding one its last token, a prefilling one its next chunk of up to
   `prefill_chunk` tokens (so prefill chunks and decode tokens share a step). Pages are allocated oldest request
   first; when the free list runs dry the newest running request is preempted: its pages and slot are freed and it
   goes back to the front of the queue, to be recomputed from its prompt and the tokens it already produced. No page
   is ever shared, so no request can overwrite or read another's data; the oldest request always progresses.
3. One `ModelRunner.step` over all slots ([max_seqs, T], T = 1 for pure decode, else a power of two up to
   `prefill_chunk`; the page-table width is fixed), so after warm-up no step recompiles.
4. Rows whose fed tokens reached the end of their sequence sample a token (per-request temperature / top-k / top-p;
   key = fold_in(key(seed), tokens generated so far), so a request's samples do not depend on batching or
   preemption), check stop tokens and max_new_tokens, stream a StepOutput, and free their pages when finished.

Chunked prefill with quantized layers is a faithful approximation of decode (DESIGN.md): a chunk's tokens see each
other in full precision. A request that is preempted is recomputed with chunks over prompt + generated tokens, so its
later tokens may differ from an uninterrupted run by that approximation (exactly equal when every layer is 16-bit).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import cache as kc
from kvtuner_jax import planner
from kvtuner_jax.errors import CacheError, KVTunerError, ManifestError
from kvtuner_jax.model import ModelConfig, Params
from kvtuner_jax.page_table import INVALID_PAGE, SequencePages
from kvtuner_jax.runtime import ModelRunner, bucket, make_batch
from kvtuner_jax.sampling import SamplingParams, sample
from kvtuner_jax.specs import LayerSpec
from pallas_kernels.paged_attention import PRECISIONS

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
MIN_PREFILL_BUCKET = 16  # smallest T of a step that carries prefill tokens (fewer distinct shapes to compile)


@dataclasses.dataclass
class Request:
    """One generation request and its progress. Read-only for callers; the engine updates it.

    finish_reason: "stop" (a stop token), "length" (max_new_tokens), "rejected" (never fits; see `error`),
    "aborted" (`Engine.abort`). `num_computed` tokens of `prompt + output` are in the cache.
    """

    request_id: Any
    prompt: list[int]
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    arrival: int
    on_output: Callable[[StepOutput], None] | None = None
    output: list[int] = dataclasses.field(default_factory=list)
    status: str = WAITING
    finish_reason: str | None = None
    error: str | None = None
    num_computed: int = 0
    num_preemptions: int = 0
    seq: SequencePages | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_span(self, start: int, stop: int) -> list[int]:
        """`tokens[start:stop]` without building the whole list (a decode step reads one token of a 16K history)."""
        n = len(self.prompt)
        if start >= n:
            return self.output[start - n : stop - n]
        return self.prompt[start:stop] + self.output[: max(0, stop - n)]

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def _pending(self) -> int:
        return len(self.prompt) + len(self.output) - self.num_computed


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """A streamed event: one new token of a request (token None when it finished without one: rejected/aborted)."""

    request_id: Any
    token: int | None
    finished: bool
    finish_reason: str | None = None
    error: str | None = None


@jax.jit
def _greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@jax.jit
def _sample_rows(logits, seeds, counts, temperature, top_k, top_p):
    """Per-row keys fold_in(key(seed), count): a request's n-th sample depends only on its seed and n."""
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
    return sample(logits, keys, temperature, top_k, top_p)


def _check_manifest(manifest, model: ModelConfig) -> tuple[LayerSpec, ...]:
    if manifest is None:
        return (planner.BF16,) * model.num_layers
    if hasattr(manifest, "check_model"):
        manifest.check_model(
            name=model.name, num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim
        )
    specs = planner.specs_of(manifest)
    if len(specs) != model.num_layers:
        raise ManifestError("layers", f"has {len(specs)} entries, model {model.name} has {model.num_layers} layers")
    return specs


class Engine:
    """Continuous batching over one model + manifest. See the module docstring for the scheduling rules.

    model, params: the decoder (`kvtuner_jax.model`). manifest: a `Manifest`, a tuple of one LayerSpec per layer, or
    None (every layer 16-bit). mesh: a ("data", "model") mesh (`kvtuner_jax.sharding`): KV heads over "model",
    slots / pages / batch rows over "data" (max_seqs must divide by the data axis; the page count is rounded down
    to a multiple of it); None runs on one device.
    max_seqs: sequence slots = batch rows of every step. max_seq_len: longest prompt + max_new_tokens accepted
    (default: the model's max_position_embeddings); fixes the page-table width. KV pool size: `num_pages`, or a budget
    (`kv_cache_gb` GiB, or `budget_bytes`), default enough for max_seqs sequences of max_seq_len. prefill_chunk:
    most prompt tokens one request feeds per step (a power of two). cache_dtype: 16-bit stores and tails (default:
    bfloat16 for a bf16 model, float32 otherwise). backend / interpret: kernel choice, as in `cache.PagedAttention`.
    precision: paged-attention operand precision: "auto" (default: bf16 operands in layers with per-channel
    quantized keys, whose kernel runs ~1.5x faster that way and whose quantization error dwarfs bf16's; "high"
    elsewhere), "high" (every layer agrees with the reference to ~1e-5) or "bf16" (FlashAttention-level); see
    `pallas_kernels.paged_attention.resolve_precision`.
    eos_ids: default stop tokens (default: the model's eos_token_ids).
    """

    def __init__(
        self,
        model: ModelConfig,
        params: Params,
        manifest=None,
        mesh=None,
        *,
        max_seqs: int = 8,
        max_seq_len: int | None = None,
        page_size: int = 32,
        num_pages: int | None = None,
        kv_cache_gb: float | None = None,
        budget_bytes: int | None = None,
        prefill_chunk: int = 256,
        cache_dtype: str | None = None,
        backend: str = "auto",
        interpret: bool = False,
        eos_ids: Sequence[int] | None = None,
        precision: str = "auto",
    ):
        if max_seqs <= 0:
            raise CacheError(f"max_seqs must be positive, got {max_seqs}")
        if precision not in PRECISIONS:
            raise CacheError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if prefill_chunk <= 0 or prefill_chunk & (prefill_chunk - 1):
            raise CacheError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
        self.model = model
        self.manifest = manifest
        self.specs = _check_manifest(manifest, model)
        self.max_seq_len = int(max_seq_len or model.max_position_embeddings)
        if self.max_seq_len <= 0:
            raise CacheError(f"max_seq_len must be positive, got {self.max_seq_len}")
        self.prefill_chunk = prefill_chunk
        self.eos_ids = frozenset(model.eos_token_ids if eos_ids is None else eos_ids)
        dtype = cache_dtype or ("bfloat16" if model.dtype == "bfloat16" else "float32")
        base = kc.CacheConfig(model.num_layers, model.num_kv_heads, model.head_dim, page_size, 1, max_seqs, dtype=dtype)
        min_r = min(s.residual_length for s in self.specs)
        self.max_pages_per_seq = max(1, (self.max_seq_len - min_r) // page_size)
        given = sum(x is not None for x in (num_pages, kv_cache_gb, budget_bytes))
        if given > 1:
            raise CacheError("give at most one of num_pages, kv_cache_gb and budget_bytes")
        if kv_cache_gb is not None:
            budget_bytes = int(kv_cache_gb * 2**30)
        if num_pages is None and budget_bytes is None:
            num_pages = max_seqs * self.max_pages_per_seq
        self.plan = planner.plan(self.specs, base, budget_bytes=budget_bytes, num_pages=num_pages)
        # With a mesh, pages and slots are split over the "data" axis: each row's pages and slot come from its own
        # data shard (row = slot, so slot s belongs to shard s // (max_seqs / data)).
        from kvtuner_jax import sharding as sh

        self.data_shards = sh.mesh_sizes(mesh)[0]
        sh.check_divisible("max_seqs", max_seqs, self.data_shards)
        pages = min(self.plan.num_pages, _gpu_page_cap(self.specs, base, backend))
        pages -= pages % self.data_shards
        if pages != self.plan.num_pages:
            self.plan = dataclasses.replace(self.plan, num_pages=pages)
        cache_cfg = dataclasses.replace(base, num_pages=pages)
        self.runner = ModelRunner(
            model, params, self.specs, cache_cfg, backend=backend, interpret=interpret, mesh=mesh, precision=precision
        )
        self.cache = self.runner.init_cache()
        self.alloc = sh.ShardedPageAllocator(pages, self.data_shards)
        self._free_slots = list(range(max_seqs - 1, -1, -1))  # pop() gives the lowest slot
        # Page-table rows by slot, kept in step with each running request's pages (rebuilding them from the page
        # lists every step cost ~1 ms of host time per step at 100 sequences of 16K tokens).
        self._table = np.full((max_seqs, self.max_pages_per_seq), INVALID_PAGE, np.int32)
        self._running: list[Request] = []  # by arrival
        self._waiting: list[Request] = []  # by arrival
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self.requests: dict[Any, Request] = {}
        self._sampler_shapes: set = set()
        self.num_steps = 0
        self.num_preemptions = 0
        self.tokens_generated = 0

    # -- sizes -----------------------------------------------------------------------------------------------------

    @property
    def cache_cfg(self) -> kc.CacheConfig:
        return self.runner.cache_cfg

    @property
    def max_seqs(self) -> int:
        return self.cache_cfg.max_seqs

    @property
    def page_size(self) -> int:
        return self.cache_cfg.page_size

    @property
    def compiles(self) -> int:
        """Distinct compiled shapes so far: model steps plus samplers."""
        return self.runner.compiles + len(self._sampler_shapes)

    # -- requests --------------------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        request_id: Any = None,
        stop_token_ids: Sequence[int] | None = None,
        on_output: Callable[[StepOutput], None] | None = None,
    ) -> Request:
        """Queues a request (prompt: token ids). Returns its Request; a request that can never fit comes back
        finished with finish_reason "rejected" and the reason in `error` (and one StepOutput to on_output)."""
        sampling = sampling or SamplingParams()
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests and not self.requests[rid].finished:
            raise KVTunerError(f"request id {rid!r} is already in use")
        stops = self.eos_ids if stop_token_ids is None else frozenset(stop_token_ids)
        req = Request(rid, [int(t) for t in prompt], sampling, stops, next(self._arrivals), on_output)
        self.requests[rid] = req
        reason = self._never_fits(req)
        if reason is not None:
            self._finish(req, "rejected", error=reason)
        elif sampling.max_new_tokens == 0:
            self._finish(req, "length")
        else:
            self._waiting.append(req)
        return req

    def _never_fits(self, req: Request) -> str | None:
        n, total = len(req.prompt), len(req.prompt) + req.sampling.max_new_tokens
        if n == 0:
            return "the prompt is empty"
        bad = [t for t in req.prompt if not 0 <= t < self.model.vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary (0..{self.model.vocab_size - 1})"
        if total > self.max_seq_len:
            return (
                f"prompt of {n} tokens + max_new_tokens {req.sampling.max_new_tokens} = {total} tokens exceeds "
                f"max_seq_len {self.max_seq_len}"
            )
        need = self.runner.pages_for(total)
        per_shard = self.alloc.num_pages // self.data_shards  # a sequence's pages all live in its data shard
        if need > per_shard:
            where = "in all" if self.data_shards == 1 else f"per data shard ({self.data_shards} shards)"
            return (
                f"prompt of {n} tokens + max_new_tokens {req.sampling.max_new_tokens} needs {need} pages of "
                f"{self.page_size} tokens; the KV cache holds {per_shard} pages {where}"
            )
        return None

    def abort(self, request_id: Any) -> None:
        """Stops a waiting or running request (its pages are freed); finished requests are left as they are."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req.status == WAITING:
            self._waiting.remove(req)
        else:
            self._release(req)
        self._finish(req, "aborted")

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- internals -------------------------------------------------------------------------------------------------

    def _finish(self, req: Request, reason: str, error: str | None = None, token: int | None = None):
        req.status, req.finish_reason, req.error = FINISHED, reason, error
        out = StepOutput(req.request_id, token, True, reason, error)
        if req.on_output is not None:
            req.on_output(out)
        return out

    def _grant(self, req: Request, pages: list[int]) -> None:
        """Appends newly allocated pages to a running request (its page list and its page-table row)."""
        have = len(req.seq.pages)
        if have + len(pages) > self.max_pages_per_seq:
            self.alloc.free(pages)
            raise CacheError(f"slot {req.seq.slot} would own {have + len(pages)} pages, a row holds "
                             f"{self.max_pages_per_seq}")  # fmt: skip
        self._table[req.seq.slot, have : have + len(pages)] = pages
        req.seq.pages += pages

    def _release(self, req: Request) -> None:
        """Frees a running request's pages and slot."""
        self.alloc.free(req.seq.pages)
        self._table[req.seq.slot] = INVALID_PAGE
        self._free_slots.append(req.seq.slot)
        self._free_slots.sort(reverse=True)
        self._running.remove(req)
        req.seq = None

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.status, req.num_computed = WAITING, 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self._waiting, req, key=lambda r: r.arrival)

    def _shard(self, slot: int) -> int:
        return slot // (self.max_seqs // self.data_shards)

    def _next_chunk(self, req: Request) -> int:
        return min(req._pending(), self.prefill_chunk)

    def _admit(self) -> None:
        # Pages the running requests will ask for in this step, per data shard; admission leaves them free.
        growth = [0] * self.data_shards
        for r in self._running:
            growth[self._shard(r.seq.slot)] += max(
                0, self.runner.pages_for(r.num_computed + self._next_chunk(r)) - len(r.seq.pages)
            )
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            need = self.runner.pages_for(len(req.prompt) + len(req.output) + 1)

            def spare(d: int) -> int:
                return self.alloc.num_free_in(d) - growth[d]

            # the lowest free slot of the data shard with the most spare pages
            slot = max(self._free_slots[::-1], key=lambda s: spare(self._shard(s)))
            d = self._shard(slot)
            if spare(d) < need:
                break  # first come, first served: later requests wait behind this one
            self._waiting.pop(0)
            self._free_slots.remove(slot)
            req.status = RUNNING
            req.seq = SequencePages(slot=slot)
            bisect.insort(self._running, req, key=lambda r: r.arrival)
            growth[d] += need

    def _schedule(self) -> list[tuple[Request, int]]:
        """(request, tokens this step) for every running request, allocating its pages; preempts newest on need."""
        sched = []
        i = 0
        while i < len(self._running):
            req = self._running[i]
            n = self._next_chunk(req)
            need = self.runner.pages_for(req.num_computed + n) - len(req.seq.pages)
            d = self._shard(req.seq.slot)
            while need > self.alloc.num_free_in(d):
                # the newest running request holding pages of this data shard (possibly req itself)
                victim = next(r for r in reversed(self._running) if self._shard(r.seq.slot) == d)
                self._preempt(victim)
                if victim is req:
                    break
            if req.status != RUNNING:
                break  # req was the newest: everything after it is preempted too
            if need > 0:
                self._grant(req, self.alloc.allocate(need, shard=d))
            sched.append((req, n))
            i += 1
        return sched

    def _sample(self, logits, rows: list[tuple[int, Request]]) -> np.ndarray:
        b = self.max_seqs
        if all(r.sampling.temperature == 0 for _, r in rows):
            self._sampler_shapes.add(("greedy", logits.shape))
            return np.asarray(_greedy(logits))
        seeds = np.zeros(b, np.uint32)
        counts = np.zeros(b, np.int32)
        temp = np.zeros(b, np.float32)
        top_k = np.zeros(b, np.int32)
        top_p = np.ones(b, np.float32)
        for row, r in rows:
            s = r.sampling
            seeds[row] = s.seed & 0xFFFFFFFF
            counts[row] = len(r.output)
            temp[row], top_k[row], top_p[row] = s.temperature, s.top_k, s.top_p
        self._sampler_shapes.add(("sample", logits.shape))
        return np.asarray(_sample_rows(logits, seeds, counts, temp, top_k, top_p))

    # -- the step --------------------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Admits, schedules and runs one model step; returns the tokens it produced (and finished requests)."""
        self._admit()
        sched = self._schedule()
        if not sched:
            return []
        b = self.max_seqs
        widest = max(n for _, n in sched)
        t = 1 if widest == 1 else min(self.prefill_chunk, bucket(widest, MIN_PREFILL_BUCKET))
        tokens = np.zeros((b, t), np.int32)
        num_new = [0] * b
        seqs: list[SequencePages | None] = [None] * b
        for req, n in sched:
            row = req.seq.slot
            tokens[row, :n] = req.token_span(req.num_computed, req.num_computed + n)
            num_new[row] = n
            seqs[row] = req.seq
        # The kept rows, as a copy (the transfer may read it after the next step changed them), with the rows of
        # running requests left out of this step (preemption on another data shard) INVALID like free slots.
        table = self._table.copy()
        table[[s is None for s in seqs]] = INVALID_PAGE
        batch = make_batch(seqs, num_new, self.max_pages_per_seq, as_numpy=self.data_shards > 1, table=table)
        logits, self.cache = self.runner.step(self.cache, tokens, batch)
        self.num_steps += 1
        emit = []
        for req, n in sched:
            req.num_computed += n
            req.seq.length += n
            if req._pending() == 0:
                emit.append((req.seq.slot, req))
        outs: list[StepOutput] = []
        if not emit:
            return outs
        nxt = self._sample(logits, emit)
        for row, req in emit:
            tok = int(nxt[row])
            req.output.append(tok)
            self.tokens_generated += 1
            if tok in req.stop_token_ids:
                reason = "stop"
            elif len(req.output) >= req.sampling.max_new_tokens:
                reason = "length"
            else:
                reason = None
            if reason is None:
                out = StepOutput(req.request_id, tok, False)
                if req.on_output is not None:
                    req.on_output(out)
            else:
                self._release(req)
                out = self._finish(req, reason, token=tok)
            outs.append(out)
        return outs

    def run(self) -> Iterator[StepOutput]:
        """Steps until every request has finished, yielding outputs as they come."""
        while self.has_unfinished():
            yield from self.step()

    def stream(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[StepOutput]:
        """Queues the prompts (request ids 0..n-1 unless taken) and yields StepOutputs until all have finished."""
        self._add_all(prompts, sampling)
        yield from self.run()

    def _add_all(self, prompts, sampling) -> list[Request]:
        if sampling is None or isinstance(sampling, SamplingParams):
            base = sampling or SamplingParams()
            # one SamplingParams for all: request i samples with seed + i, so rows differ
            sampling = [dataclasses.replace(base, seed=base.seed + i) for i in range(len(prompts))]
        if len(sampling) != len(prompts):
            raise KVTunerError(f"{len(prompts)} prompts but {len(sampling)} sampling parameter sets")
        return [self.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_output: Callable[[int, StepOutput], None] | None = None,
        raise_on_reject: bool = True,
    ) -> list[list[int]]:
        """Generates for every prompt (token ids) with continuous batching; returns the new tokens per prompt.

        A rejected prompt raises CacheError naming it (or, with raise_on_reject=False, yields an empty list).
        on_output(i, StepOutput) streams tokens of prompt i.
        """
        reqs = self._add_all(prompts, sampling)
        if raise_on_reject:
            for i, r in enumerate(reqs):
                if r.finish_reason == "rejected":
                    for other in reqs:
                        self.abort(other.request_id)
                    raise CacheError(f"prompt {i}: {r.error}")
        index = {r.request_id: i for i, r in enumerate(reqs)}
        for out in self.run():
            if on_output is not None and out.request_id in index:
                on_output(index[out.request_id], out)
        return [list(r.output) for r in reqs]

    # -- telemetry -------------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Per-layer bits, KV bytes in use (exact bytes of the cached tokens) and reserved (allocated pages + the
        tails of occupied slots), the pool, effective bits, pages free, tokens cached, steps, preemptions, compiles."""
        cc = self.cache_cfg
        per_tok_full = 2 * cc.num_kv_heads * cc.head_dim * cc.jnp_dtype.itemsize
        layer_page = [kc.layer_bytes_per_page(s, cc) for s in self.specs]
        in_use = 0
        tokens = 0
        for r in self._running:
            length = r.seq.length
            tokens += length
            for s, pb in zip(self.specs, layer_page, strict=True):
                q = int(kc.num_quantized(np.asarray(length), s.residual_length, cc.page_size))
                in_use += (q // cc.page_size) * pb + (length - q) * per_tok_full
        allocated = self.alloc.num_pages - self.alloc.num_free
        reserved = allocated * self.plan.page_bytes + len(self._running) * planner.tail_bytes_per_seq(self.specs, cc)
        return {
            "layer_bits": [list(b) for b in self.plan.layer_bits],
            "effective_bits": self.plan.effective_bits,
            "kv_bytes_in_use": int(in_use),
            "kv_bytes_reserved": int(reserved),
            "kv_bytes_pool": int(self.plan.pool_bytes),
            "pages_total": self.alloc.num_pages,
            "pages_free": self.alloc.num_free,
            "tokens_cached": tokens,
            "running": len(self._running),
            "waiting": len(self._waiting),
            "steps": self.num_steps,
            "tokens_generated": self.tokens_generated,
            "preemptions": self.num_preemptions,
            "compiles": self.compiles,
        }

    def stats_line(self) -> str:
        s = self.stats()
        bits = s["layer_bits"]
        runs = []  # run-length form of the per-layer bits: "0-5:8/4 6:4/2 ..."
        start = 0
        for i in range(1, len(bits) + 1):
            if i == len(bits) or bits[i] != bits[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"{span}:{bits[start][0]}/{bits[start][1]}")
                start = i
        mib = 2**20
        return (
            f"stats: layers K/V bits {' '.join(runs)}; effective {s['effective_bits']:.2f} bits; KV in use "
            f"{s['kv_bytes_in_use'] / mib:.2f} MiB, reserved {s['kv_bytes_reserved'] / mib:.2f} MiB of "
            f"{s['kv_bytes_pool'] / mib:.2f} MiB; pages free {s['pages_free']}/{s['pages_total']}; tokens cached "
            f"{s['tokens_cached']}; steps {s['steps']}; preemptions {s['preemptions']}; compiles {s['compiles']}"
        )

    # -- benchmark-only --------------------------------------------------------------------------------------------

    def fill_random(self, num_seqs: int, context: int, seed: int = 0, sampling: SamplingParams | None = None):
        """BENCHMARK ONLY: starts `num_seqs` requests that already hold `context` cached tokens of random K/V.

        Skips prefill (a 16K-token prefill per sequence would dominate a decode benchmark): every pool and tail is
        filled with random codes / scales / values and each request gets pages as if its prompt had been computed,
        so the next `step()` is a decode step at that context. The tokens such requests produce are meaningless.
        """
        sampling = sampling or SamplingParams(max_new_tokens=self.max_seq_len - context)
        if context + sampling.max_new_tokens > self.max_seq_len:
            raise CacheError(f"context {context} + max_new_tokens exceeds max_seq_len {self.max_seq_len}")
        self.cache = _randomize(self.cache, jax.random.key(seed))
        rng = np.random.default_rng(seed)
        reqs = []
        for _ in range(num_seqs):
            if not self._free_slots:
                raise CacheError(f"only {self.max_seqs} sequence slots")
            prompt = rng.integers(0, self.model.vocab_size, context + 1).tolist()
            req = Request(next(self._ids), prompt, sampling, frozenset(), next(self._arrivals))
            self.requests[req.request_id] = req
            req.seq = SequencePages(slot=self._free_slots.pop(), length=context)
            self._grant(req, self.alloc.allocate(self.runner.pages_for(context), shard=self._shard(req.seq.slot)))
            req.num_computed, req.status = context, RUNNING
            self._running.append(req)
            reqs.append(req)
        return reqs


def _gpu_page_cap(specs, cfg: kc.CacheConfig, backend: str) -> int:
    """Most pages the GPU kernels can address: a 1-byte pool array of one layer must stay within 2^31 elements
    (`pallas_kernels.paged_attention_gpu.check_index_range`); no cap on other backends."""
    from pallas_kernels import layout
    from pallas_kernels.paged_attention import resolve_backend

    if resolve_backend(backend) != "gpu":
        return 2**62
    from pallas_kernels.paged_attention_gpu import MAX_1BYTE_POOL_ELEMENTS

    cap = 2**62
    for s in specs:
        for kv in (s.k, s.v):
            if layout.codes_dtype(kv).itemsize == 1:
                per_page = int(np.prod(layout.codes_shape(kv, cfg.num_kv_heads, 1, cfg.page_size, cfg.head_dim)))
                cap = min(cap, MAX_1BYTE_POOL_ELEMENTS // per_page)
    return cap


def _randomize(cache: kc.KVCache, key) -> kc.KVCache:
    """Every leaf of the cache replaced by pseudo-random data of its dtype (benchmark only), one layer at a time.

    The data is a hash of each element's index, computed elementwise into the donated buffer: no temporaries (a
    full-memory pool leaves no room for threefry's float32 / uint32 intermediates, several times a pool array).
    """
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    layers = []
    for i, layer in enumerate(cache.layers):
        # Waited for one layer at a time: each call writes fresh buffers and frees the donated ones only when it has
        # run, so dispatching every layer asynchronously could hold a second copy of the whole cache on a GPU.
        layers.append(jax.block_until_ready(_randomize_layer(layer, jnp.uint32(seed + 7919 * i))))
    return kc.KVCache(layers=tuple(layers))


def _hash_unit(shape, seed, salt: int) -> jnp.ndarray:
    """float32 in [0, 1) per element: a multiplicative hash of the element's flat index (fuses into its consumer)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for ax in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, ax) * jnp.uint32(stride % 2**32)
        stride *= shape[ax]
    h = (idx + seed * jnp.uint32(0x9E3779B9) + jnp.uint32(salt)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) * (1.0 / 2**24)


# keep_unused: the layer is only read for its shapes, and jit would otherwise prune it from the computation, so
# nothing is aliased and each call holds a fresh layer next to the donated one (one extra layer, >1 GiB on the 8B).
@partial(jax.jit, donate_argnums=0, keep_unused=True)
def _randomize_layer(layer: kc.LayerCache, seed) -> kc.LayerCache:
    def values(x, salt):  # 16-bit pools and tails: uniform in [-1.7, 1.7) (unit variance)
        return ((_hash_unit(x.shape, seed, salt) * 2.0 - 1.0) * 1.732).astype(x.dtype)

    def pool(p: kc.Pool, salt: int) -> kc.Pool:
        if not p.spec.quantized:
            return dataclasses.replace(p, codes=values(p.codes, salt))
        codes = (_hash_unit(p.codes.shape, seed, salt) * 256.0).astype(jnp.uint8).astype(p.codes.dtype)
        # scales in [0.01, 0.1] and zeros in [-1, 0]: dequantized values stay O(1), like real keys and values
        scale = (0.01 + 0.09 * _hash_unit(p.scale.shape, seed, salt + 1)).astype(p.scale.dtype)
        zero = None if p.zero is None else (-_hash_unit(p.zero.shape, seed, salt + 2)).astype(p.zero.dtype)
        return dataclasses.replace(p, codes=codes, scale=scale, zero=zero)

    return dataclasses.replace(
        layer,
        k=pool(layer.k, 1),
        v=pool(layer.v, 11),
        k_tail=values(layer.k_tail, 21),
        v_tail=values(layer.v_tail, 31),
    )
