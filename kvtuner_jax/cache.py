"""The paged, per-layer mixed-precision KV cache: device pytrees and the functional write/attend operations.

Layout (DESIGN.md "Cache layout"):
- One page table for all layers: logical page i of a sequence is the same physical page in every layer's pool.
  The host-side allocator lives in `kvtuner_jax.page_table`; this module only sees the table as an int32 array.
- Per layer a `LayerCache`: K and V pools in the layout of `pallas_kernels.layout` (packed codes + scales/zeros,
  or plain values for 16-bit stores), and a full-precision tail per sequence slot `[H, S, C, D]`, C = R + P, kept
  as a ring: absolute position a lives in row a % C, so a step writes only its new tokens' rows.
- Residual window: a sequence of length L keeps its first Q(L) = max(0, floor((L - R) / P)) * P tokens in pages and
  the rest (< R + P tokens) in its tail. A step that appends n tokens attends with the state at its start (pages
  hold Q(L) tokens) plus the tail plus the step's own tokens (causal), then moves the pages that became complete
  (Q(L + n) - Q(L) tokens, whole pages) out of the tail through the packed write. Each token is quantized exactly once
  and nothing quantized is ever re-quantized. For decode (n = 1) this is exactly DESIGN.md's decode semantics.
- Attention = paged attention over the quantized pages (a Pallas kernel, or its reference), which returns a
  normalized output and log-sum-exp, merged exactly with attention over the tail and the new tokens in plain jnp.

Every function here is pure: caches go in and come out; jit donates them so updates are in place.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

from kvtuner_jax.errors import CacheError
from kvtuner_jax.page_table import INVALID_PAGE  # one sentinel for host and device
from kvtuner_jax.rotation import maybe_rotate
from kvtuner_jax.specs import KVSpec, LayerSpec
from pallas_kernels import layout
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.quantize_write import quantize_write


def static_field(**kw):
    return dataclasses.field(metadata={"static": True}, **kw)


def num_quantized(length: jnp.ndarray, residual: int, page_size: int) -> jnp.ndarray:
    """Q(L): tokens of a length-L sequence that live in quantized pages (a multiple of the page size)."""
    return jnp.maximum(0, (length - residual) // page_size) * page_size


def tail_capacity(residual: int, page_size: int) -> int:
    """Tail slots per sequence: after a step at most R + P - 1 tokens stay in full precision."""
    return residual + page_size


@partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale", "zero"], meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class Pool:
    """One K or V store of one layer, in `pallas_kernels.layout` layout (scale/zero None where absent)."""

    codes: jnp.ndarray  # [H, N, P, D*b/8] | [H, N, P*b/8, D] uint8, or [H, N, P, D] cache dtype when 16-bit
    scale: jnp.ndarray | None  # [H, N, P, D/G] | [H, N, P/G, D]
    zero: jnp.ndarray | None  # like scale, None when symmetric
    spec: KVSpec


@partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "k_tail", "v_tail"], meta_fields=["spec", "page_size"]
)
@dataclasses.dataclass(frozen=True)
class LayerCache:
    k: Pool
    v: Pool
    k_tail: jnp.ndarray  # [H, S, C, D] cache dtype
    v_tail: jnp.ndarray  # [H, S, C, D] cache dtype
    spec: LayerSpec
    page_size: int


@partial(jax.tree_util.register_dataclass, data_fields=["layers"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerCache, ...]


@partial(jax.tree_util.register_dataclass, data_fields=["page_table", "lengths", "num_new", "slots"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """Per step, per batch row. Rows with num_new == 0 are padding: they read nothing real and write nothing."""

    page_table: jnp.ndarray  # [B, max_pages] int32 physical page ids, INVALID_PAGE past the allocation
    lengths: jnp.ndarray  # [B] int32 tokens already cached before this step
    num_new: jnp.ndarray  # [B] int32 valid new tokens in this step (<= T)
    slots: jnp.ndarray  # [B] int32 tail slot of the sequence


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Static sizes of a cache. `dtype` stores 16-bit layers and every tail (bf16 serving; float32 for exact eval)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    max_seqs: int
    dtype: str = "bfloat16"

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


def check_layer(spec: LayerSpec, page_size: int, head_dim: int, where: str = "") -> None:
    for name, kv in (("k", spec.k), ("v", spec.v)):
        try:
            layout.check_spec(kv, page_size, head_dim)
        except ValueError as e:
            raise CacheError(f"{where}{name}: {e}") from None
    if spec.residual_length < 0:
        raise CacheError(f"{where}residual_length must be >= 0, got {spec.residual_length}")


def layer_bytes_per_page(spec: LayerSpec, cfg: CacheConfig) -> int:
    """Bytes of one physical page of one layer, K and V, all KV heads (codes + scales + zeros)."""
    args = (cfg.num_kv_heads, cfg.page_size, cfg.head_dim, cfg.jnp_dtype)
    return layout.bytes_per_page(spec.k, *args) + layout.bytes_per_page(spec.v, *args)


def tail_bytes(specs: tuple[LayerSpec, ...], cfg: CacheConfig) -> int:
    """Bytes of every layer's full-precision tails for all sequence slots (K and V)."""
    per_tok = 2 * cfg.num_kv_heads * cfg.head_dim * cfg.jnp_dtype.itemsize
    return sum(cfg.max_seqs * tail_capacity(s.residual_length, cfg.page_size) * per_tok for s in specs)


def pages_for_budget(specs: tuple[LayerSpec, ...], cfg: CacheConfig, budget_bytes: int) -> int:
    """DESIGN.md: num_pages = (budget - tails) // sum over layers of bytes_per_page(layer)."""
    per_page = sum(layer_bytes_per_page(s, cfg) for s in specs)
    avail = budget_bytes - tail_bytes(specs, cfg)
    if avail < per_page:
        raise CacheError(
            f"a KV budget of {budget_bytes} bytes holds no page: tails need {tail_bytes(specs, cfg)} bytes "
            f"and one page of all layers {per_page} bytes"
        )
    return int(avail // per_page)


def init_cache(specs: tuple[LayerSpec, ...], cfg: CacheConfig) -> KVCache:
    """Allocates every layer's pools (zeros) and tails. Shapes come from `pallas_kernels.layout` alone."""
    if len(specs) != cfg.num_layers:
        raise CacheError(f"manifest has {len(specs)} layers, the cache config {cfg.num_layers}")
    layers = []
    h, n, p, d = cfg.num_kv_heads, cfg.num_pages, cfg.page_size, cfg.head_dim
    for i, spec in enumerate(specs):
        check_layer(spec, p, d, where=f"layers[{i}].")
        k = Pool(*layout.allocate(spec.k, h, n, p, d, cfg.jnp_dtype), spec=spec.k)
        v = Pool(*layout.allocate(spec.v, h, n, p, d, cfg.jnp_dtype), spec=spec.v)
        c = tail_capacity(spec.residual_length, p)
        # separate buffers: jit donates the cache, and one buffer may not be donated twice
        k_tail = jnp.zeros((h, cfg.max_seqs, c, d), cfg.jnp_dtype)
        v_tail = jnp.zeros((h, cfg.max_seqs, c, d), cfg.jnp_dtype)
        layers.append(LayerCache(k=k, v=v, k_tail=k_tail, v_tail=v_tail, spec=spec, page_size=p))
    return KVCache(layers=tuple(layers))


# ---------------------------------------------------------------------------------------------------------------
# Attention over one layer's cache + the step's new tokens.


def _tail_attention(q, k_tail, v_tail, k_new, v_new, in_tail, num_new, sm_scale):
    """Attention of the step's queries over [tail tokens, new tokens] in float32.

    q [B, T, Hq, D]; k_tail/v_tail [H, B, C, D] (each row's ring, as stored); in_tail [B, C] which ring rows hold
    this sequence's tail; k_new/v_new [B, T, H, D]; num_new [B]. The ring's row order does not matter (softmax is
    order-free), and the two key sets are scored separately, so no [B, H, C + T, D] concatenation is materialized.
    Returns (out [B, Hq, T, D] normalized, lse [B, Hq, T]) with lse = -inf where nothing is visible.
    """
    b, t, hq, d = q.shape
    h, c = k_tail.shape[0], k_tail.shape[2]
    f32 = jnp.float32
    qg = q.astype(f32).reshape(b, t, h, hq // h, d)
    s_tail = jnp.einsum("BTHGD,HBSD->BHGTS", qg, k_tail.astype(f32)) * sm_scale
    s_new = jnp.einsum("BTHGD,BSHD->BHGTS", qg, k_new.astype(f32)) * sm_scale
    i = jnp.arange(t)  # query i sees new key j <= i of the num_new valid ones (causal inside the step)
    in_new = (i[None, None, :] <= i[None, :, None]) & (i[None, None, :] < num_new[:, None, None])  # [B, T, T]
    visible = jnp.concatenate([jnp.broadcast_to(in_tail[:, None, :], (b, t, c)), in_new], axis=-1)  # [B, T, C+T]
    s = jnp.concatenate([s_tail, s_new], axis=-1)  # [B, H, G, T, C+T]: scores only, small
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("BHGTS,HBSD->BHGTD", p[..., :c], v_tail.astype(f32))
    out = out + jnp.einsum("BHGTS,BSHD->BHGTD", p[..., c:], v_new.astype(f32))
    out = out / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)


def ring_rows_in_tail(nq: jnp.ndarray, tail_len: jnp.ndarray, capacity: int) -> jnp.ndarray:
    """[B, C] bool: which rows of each sequence's tail ring hold its tail, positions [nq, nq + tail_len).

    The tail is a ring: absolute position a lives in row a % C. A step writes only its new tokens' rows and reads
    pages that leave the tail from their rows, so no step rewrites a whole tail (tail_len <= C - 1 between steps).
    """
    return (jnp.arange(capacity)[None, :] - nq[:, None]) % capacity < tail_len[:, None]


def merge_attention(o1, lse1, o2, lse2):
    """Exact merge of two softmax-normalized partial attentions over disjoint key sets (flash-decoding combine)."""
    m = jnp.maximum(lse1, lse2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1 = jnp.exp(lse1 - m)[..., None]
    w2 = jnp.exp(lse2 - m)[..., None]
    den = w1 + w2
    return (w1 * o1 + w2 * o2) / jnp.where(den > 0, den, 1.0)


def attend(
    layer: LayerCache,
    q: jnp.ndarray,
    k_new: jnp.ndarray,
    v_new: jnp.ndarray,
    batch: BatchInfo,
    *,
    backend: str = "auto",
    interpret: bool = False,
    precision: str = "high",
) -> jnp.ndarray:
    """Attention of a step's queries over this layer's cache plus the step's own K/V.

    precision: the paged kernel's operand precision ("high" or "bf16", see `pallas_kernels.paged_attention`).

    q [B, T, Hq, D], k_new/v_new [B, T, H, D] (RoPE'd) -> out [B, T, Hq, D] float32. The cache is read at its state
    before the step (Q(L) tokens in pages). Padded query rows (t >= num_new) get finite, meaningless values.
    """
    spec = layer.spec
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d)
    res, p = spec.residual_length, layer.page_size
    q, k_new = maybe_rotate(spec, q, k_new)
    qt = jnp.transpose(q, (0, 2, 1, 3))  # [B, Hq, T, D]
    nq = num_quantized(batch.lengths, res, p)
    o1, lse1 = paged_attention(
        qt,
        layer.k.codes,
        layer.k.scale,
        layer.k.zero,
        layer.v.codes,
        layer.v.scale,
        layer.v.zero,
        batch.page_table,
        nq,
        k_spec=spec.k,
        v_spec=spec.v,
        sm_scale=sm_scale,
        backend=backend,
        interpret=interpret,
        precision=precision,
    )
    slots = jnp.clip(batch.slots, 0, layer.k_tail.shape[1] - 1)
    in_tail = ring_rows_in_tail(nq, batch.lengths - nq, layer.k_tail.shape[2])
    o2, lse2 = _tail_attention(
        q, layer.k_tail[:, slots], layer.v_tail[:, slots], k_new, v_new, in_tail, batch.num_new, sm_scale
    )
    out = merge_attention(o1, lse1, o2, lse2)
    return jnp.transpose(out, (0, 2, 1, 3))


# ---------------------------------------------------------------------------------------------------------------
# Appending the step's tokens: tail update and page flush.


def max_flush_pages(spec: LayerSpec, page_size: int, step_len: int) -> int:
    """Most pages one sequence can complete in a step of `step_len` tokens (static): ceil(T / P).

    Q(L) = max(0, (L - R) // P) * P, and floor((x + T) / P) - floor(x / P) <= ceil(T / P) (max(0, .) only lowers
    the difference), so a decode step flushes at most one page whatever R is.
    """
    return -(-step_len // page_size)


def append(
    layer: LayerCache,
    k_new: jnp.ndarray,
    v_new: jnp.ndarray,
    batch: BatchInfo,
    *,
    backend: str = "auto",
    interpret: bool = False,
) -> LayerCache:
    """Appends the step's K/V ([B, T, H, D]; only the first num_new rows of each sequence) to the cache.

    Tokens that leave the residual window go to their pages as whole pages, quantized once by the packed write;
    the rest become the sequence's new tail. Rows with num_new == 0 write nothing (their slot is untouched).
    """
    spec = layer.spec
    res, p = spec.residual_length, layer.page_size
    _, k_new = maybe_rotate(spec, None, k_new)
    b, t, h, d = k_new.shape
    c = layer.k_tail.shape[2]
    s_slots = layer.k_tail.shape[1]
    lengths, n = batch.lengths, batch.num_new
    nq_old = num_quantized(lengths, res, p)
    nq_new = num_quantized(lengths + n, res, p)
    active = n > 0
    slots = jnp.clip(batch.slots, 0, s_slots - 1)

    # Pages leaving the tail this step: f = (nq_new - nq_old) / P per sequence, at most fmax (static). Their tokens,
    # positions nq_old + f * P + i, are in the tail ring (positions < length) or among the step's new tokens.
    fmax = max_flush_pages(spec, p, t)
    flush = (nq_new - nq_old) // p  # [B]
    k_pool, v_pool, k_tail, v_tail = layer.k, layer.v, layer.k_tail, layer.v_tail
    if fmax > 0:
        fi = jnp.arange(fmax)
        pos = nq_old[:, None, None] + fi[None, :, None] * p + jnp.arange(p)[None, None, :]  # [B, F, P]
        from_tail = (pos < lengths[:, None, None])[None, ..., None]
        ring = pos % c
        src_new = jnp.clip(pos - lengths[:, None, None], 0, t - 1)

        def gather_pages(tail_arr, new):  # -> [H, B*F, P, D]
            tv = tail_arr[:, slots[:, None, None], ring]  # [H, B, F, P, D]
            nv = jnp.transpose(new[jnp.arange(b)[:, None, None], src_new], (3, 0, 1, 2, 4)).astype(tail_arr.dtype)
            return jnp.where(from_tail, tv, nv).reshape(h, b * fmax, p, d)

        logical = nq_old[:, None] // p + fi[None, :]  # [B, F]
        mp = batch.page_table.shape[1]
        phys = jnp.take_along_axis(batch.page_table, jnp.clip(logical, 0, mp - 1), axis=1)
        ok = (fi[None, :] < flush[:, None]) & active[:, None] & (logical < mp)
        dest = jnp.where(ok, phys, INVALID_PAGE).reshape(-1).astype(jnp.int32)
        kp, vp = gather_pages(k_tail, k_new), gather_pages(v_tail, v_new)
        # The rings are updated in place below; without this, XLA copies each whole ring to keep the reads valid.
        kp, vp, k_tail, v_tail = jax.lax.optimization_barrier((kp, vp, k_tail, v_tail))
        k_pool = _write(k_pool, kp, dest, backend, interpret)
        v_pool = _write(v_pool, vp, dest, backend, interpret)

    # New tail: the step's tokens that stay in full precision (positions >= nq_new) go to their ring rows. Those
    # rows held positions < nq_new (the window after the step is under C long), which are in pages now.
    i = jnp.arange(t)
    new_pos = lengths[:, None] + i[None, :]  # [B, T]
    keep = (i[None, :] < n[:, None]) & (new_pos >= nq_new[:, None])
    dst_slot = jnp.where(keep, slots[:, None], s_slots)  # not kept -> out of range -> dropped
    dst_row = new_pos % c

    def new_tail(tail_arr, new):
        vals = jnp.transpose(new, (2, 0, 1, 3)).astype(tail_arr.dtype)  # [H, B, T, D]
        return tail_arr.at[:, dst_slot, dst_row].set(vals, mode="drop")

    return dataclasses.replace(
        layer,
        k=k_pool,
        v=v_pool,
        k_tail=new_tail(k_tail, k_new),
        v_tail=new_tail(v_tail, v_new),
    )


def _write(pool: Pool, pages: jnp.ndarray, dest: jnp.ndarray, backend: str, interpret: bool) -> Pool:
    codes, scale, zero = quantize_write(
        pool.codes, pool.scale, pool.zero, pages, dest, spec=pool.spec, backend=backend, interpret=interpret
    )
    return dataclasses.replace(pool, codes=codes, scale=scale, zero=zero)


# ---------------------------------------------------------------------------------------------------------------
# The model-facing attention object (the `attention` protocol of kvtuner_jax.model.forward).


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """Attention through the paged cache. `state` is `(KVCache, BatchInfo)`; the returned state holds the new cache.

    Static under jit (hashable): the backend choice is a Python string. With a `mesh` (axes "data", "model"), each
    layer's cache work (paged attention, tail attention, packed write, tail update) runs under `shard_map`: KV heads
    of q/k/v and of every pool and tail on "model", batch rows with their pages and slots on "data"
    (`kvtuner_jax.sharding` states the layout). The whole layer op is one manual region, not only the kernels,
    because the tail gathers and scatters index by slot, and only inside the region is it known that a data
    shard's slots and pages are its own; left to the partitioner they would all-gather the cache.
    """

    backend: str = "auto"
    interpret: bool = False
    mesh: jax.sharding.Mesh | None = None
    precision: str = "high"  # paged kernel operands: "high" or "bf16" (pallas_kernels.paged_attention)

    def __call__(self, layer_idx, q, k, v, positions, state):
        cache, batch = state
        layer = cache.layers[layer_idx]
        if self.mesh is None:
            out, new_layer = self._layer(layer, q, k, v, batch)
        else:
            out, new_layer = self._sharded_layer(layer, q, k, v, batch)
        layers = cache.layers[:layer_idx] + (new_layer,) + cache.layers[layer_idx + 1 :]
        return out.astype(q.dtype), (KVCache(layers=layers), batch)

    def _layer(self, layer, q, k, v, batch):
        out = attend(layer, q, k, v, batch, backend=self.backend, interpret=self.interpret, precision=self.precision)
        # The write below updates the pools in place. Nothing orders it after the read above, so XLA protects the
        # read with a copy of every pool (temporaries as large as the whole cache: the full-memory OOM on the H100).
        # The barrier makes the write consume what the read produced.
        out, layer = jax.lax.optimization_barrier((out, layer))
        return out, append(layer, k, v, batch, backend=self.backend, interpret=self.interpret)

    def _sharded_layer(self, layer, q, k, v, batch):
        from jax.sharding import PartitionSpec as P

        from kvtuner_jax import sharding

        heads = P(sharding.RULES["batch"], None, sharding.RULES["kv_heads"], None)  # q/k/v/out [B, T, H, D]
        lspec = sharding.cache_specs(layer)
        bspec = sharding.batch_specs()

        def local(layer, q, k, v, batch):
            pt, slots, num_new = sharding.localize_batch(
                batch.page_table, batch.slots, batch.num_new, layer.k.codes.shape[1], layer.k_tail.shape[1]
            )
            batch = BatchInfo(page_table=pt, lengths=batch.lengths, num_new=num_new, slots=slots)
            return self._layer(layer, q, k, v, batch)

        fn = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(lspec, heads, heads, heads, bspec),
            out_specs=(heads, lspec),
            check_vma=False,
        )
        return fn(layer, q, k, v, batch)


# ---------------------------------------------------------------------------------------------------------------
# Reading a sequence back (tests, debugging): the K/V history a query would see at the cache's current state.


def read_sequence(layer: LayerCache, page_row: jnp.ndarray, length: int, slot: int):
    """Dequantized K and V of one sequence, `[H, length, D]` float32 each: pages first, then the tail."""
    spec = layer.spec
    nq = int(num_quantized(jnp.asarray(length), spec.residual_length, layer.page_size))
    from pallas_kernels.paged_attention import gather_pages

    d = layer.k_tail.shape[-1]
    out = []
    for pool, tail in ((layer.k, layer.k_tail), (layer.v, layer.v_tail)):
        pages = gather_pages(pool.codes, pool.scale, pool.zero, pool.spec, page_row[None], d)[0]  # [H, S, D]
        ring = jnp.arange(nq, length) % tail.shape[2]  # the tail ring's rows, oldest position first
        seq = jnp.concatenate([pages[:, :nq], tail[:, slot, ring].astype(jnp.float32)], axis=1)
        out.append(seq)
    return out[0], out[1]
