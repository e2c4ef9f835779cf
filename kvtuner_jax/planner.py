"""Memory planner: from a device-memory budget (or a page count) and a manifest to pages, tokens and capacity gain.

The figures come from the same per-layer byte arithmetic the cache allocates with (`cache.layer_bytes_per_page`,
`cache.tail_bytes`, which read `pallas_kernels.layout`), so the plan, the allocator and the device buffers cannot
disagree. The "bf16 cache" the gain is measured against stores every layer's K and V unquantized in bfloat16 with
no residual window, at the same page size, number of sequence slots and budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvtuner_jax import cache as kc
from kvtuner_jax.errors import CacheError
from kvtuner_jax.page_table import pages_needed
from kvtuner_jax.specs import KVSpec, LayerSpec

BF16 = LayerSpec(KVSpec(16), KVSpec(16), residual_length=0)


def specs_of(manifest_or_specs) -> tuple[LayerSpec, ...]:
    """A Manifest (anything with `layer_specs()`), a sequence of LayerSpec, or None (every layer bf16)."""
    if manifest_or_specs is None:
        raise CacheError("no manifest given")
    if hasattr(manifest_or_specs, "layer_specs"):
        return tuple(manifest_or_specs.layer_specs())
    return tuple(manifest_or_specs)


def page_bytes(specs: Sequence[LayerSpec], cfg: kc.CacheConfig) -> int:
    """Bytes of one page index across all layers (K + V, codes + scales + zeros)."""
    return sum(kc.layer_bytes_per_page(s, cfg) for s in specs)


def tail_bytes_per_seq(specs: Sequence[LayerSpec], cfg: kc.CacheConfig) -> int:
    """Bytes of one sequence slot's full-precision tails over all layers."""
    return kc.tail_bytes(tuple(specs), dataclasses.replace(cfg, max_seqs=1))


def effective_bits(specs: Sequence[LayerSpec], cfg: kc.CacheConfig) -> float:
    """Bits per stored K/V element in pages, scales and zero-points included."""
    elems = 2 * len(specs) * cfg.num_kv_heads * cfg.head_dim * cfg.page_size
    return 8 * page_bytes(specs, cfg) / elems


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What a KV budget buys for one manifest. Bytes are device bytes; tokens are token slots of the whole pool.

    num_pages: physical pages (each holds page_size tokens in every layer). page_bytes: one page index, all layers.
    tail_bytes: the full-precision tails of all max_seqs slots. budget_bytes: the budget planned for (None when the
    page count was given: then the comparison with bf16 uses this plan's own pool bytes as the budget).
    bf16_num_pages: pages a bf16 cache gets from the same budget and slots.
    """

    num_pages: int
    page_size: int
    max_seqs: int
    page_bytes: int
    tail_bytes: int
    min_residual: int
    budget_bytes: int | None
    effective_bits: float
    layer_bits: tuple[tuple[int, int], ...]
    bf16_num_pages: int

    @property
    def pool_bytes(self) -> int:
        """Device bytes of the whole cache: all pages of all layers plus all tails."""
        return self.num_pages * self.page_bytes + self.tail_bytes

    @property
    def max_tokens(self) -> int:
        """Tokens the pool holds at once over all sequences: every page full, plus each slot's shortest residual
        window (tokens below min_residual of a sequence need no page)."""
        return self.num_pages * self.page_size + self.max_seqs * self.min_residual

    @property
    def bf16_max_tokens(self) -> int:
        return self.bf16_num_pages * self.page_size

    @property
    def capacity_gain(self) -> float:
        """Concurrent tokens of this plan / those of a bf16 cache in the same memory."""
        return self.max_tokens / max(1, self.bf16_max_tokens)

    def max_batch(self, context: int) -> int:
        """Sequences of `context` tokens that fit at once (also bounded by max_seqs)."""
        need = pages_needed(context, self.min_residual, self.page_size)
        return min(self.max_seqs, self.num_pages // max(1, need))

    def lines(self) -> list[str]:
        gib = 2**30
        head = f"{self.budget_bytes / gib:.2f} GiB budget" if self.budget_bytes is not None else "page count given"
        return [
            f"KV plan ({head}): {self.num_pages} pages x {self.page_size} tokens, {self.page_bytes} B per page over "
            f"{len(self.layer_bits)} layers, effective {self.effective_bits:.2f} bits/element",
            f"KV pool {self.pool_bytes / gib:.3f} GiB (tails {self.tail_bytes / 2**20:.1f} MiB for {self.max_seqs} "
            f"slots); max concurrent tokens {self.max_tokens} vs {self.bf16_max_tokens} for a bf16 cache in the "
            f"same memory: {self.capacity_gain:.2f}x",
        ]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            pool_bytes=self.pool_bytes,
            max_tokens=self.max_tokens,
            bf16_max_tokens=self.bf16_max_tokens,
            capacity_gain=self.capacity_gain,
        )
        d["layer_bits"] = [list(b) for b in self.layer_bits]
        return d


def plan(
    specs: Sequence[LayerSpec],
    cfg: kc.CacheConfig,
    *,
    budget_bytes: int | None = None,
    num_pages: int | None = None,
) -> MemoryPlan:
    """Plans the pool for `specs` with the static sizes of `cfg` (its num_pages is ignored).

    Exactly one of budget_bytes (device bytes for pages + tails) and num_pages must be given.
    Raises CacheError when the budget holds no page.
    """
    specs = tuple(specs)
    if (budget_bytes is None) == (num_pages is None):
        raise CacheError("give exactly one of a KV budget (bytes / --kv_cache_gb) and a page count (--num_pages)")
    if num_pages is not None:
        if num_pages <= 0:
            raise CacheError(f"num_pages must be positive, got {num_pages}")
        pages = int(num_pages)
    else:
        pages = kc.pages_for_budget(specs, cfg, int(budget_bytes))
    pb = page_bytes(specs, cfg)
    tb = kc.tail_bytes(specs, cfg)
    budget_for_bf16 = int(budget_bytes) if budget_bytes is not None else pages * pb + tb
    bf16_cfg = dataclasses.replace(cfg, dtype="bfloat16")
    bf16_specs = (BF16,) * len(specs)
    bf16_avail = budget_for_bf16 - kc.tail_bytes(bf16_specs, bf16_cfg)
    bf16_pages = max(0, bf16_avail // page_bytes(bf16_specs, bf16_cfg))
    return MemoryPlan(
        num_pages=pages,
        page_size=cfg.page_size,
        max_seqs=cfg.max_seqs,
        page_bytes=pb,
        tail_bytes=tb,
        min_residual=min(s.residual_length for s in specs),
        budget_bytes=None if budget_bytes is None else int(budget_bytes),
        effective_bits=effective_bits(specs, cfg),
        layer_bits=tuple((s.k.bits, s.v.bits) for s in specs),
        bf16_num_pages=int(bf16_pages),
    )


def max_batch_for_budget(specs: Sequence[LayerSpec], cfg: kc.CacheConfig, budget_bytes: int, context: int) -> int:
    """Largest number of sequences of `context` tokens whose pages and tails fit in `budget_bytes` (slots sized to
    the batch, as a benchmark or server would size them). 0 when not even one fits."""
    specs = tuple(specs)
    per_seq = pages_needed(context, min(s.residual_length for s in specs), cfg.page_size) * page_bytes(specs, cfg)
    per_seq += tail_bytes_per_seq(specs, cfg)
    return int(budget_bytes // per_seq)


def device_budget_bytes(fraction: float = 0.9, reserve_bytes: int = 0) -> int:
    """Free memory of the first local device times `fraction`, minus `reserve_bytes` (activations, compile scratch).

    Raises CacheError on platforms that report no memory statistics (CPU): give --kv_cache_gb or --num_pages there.
    """
    import jax

    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        raise CacheError(f"device {dev} reports no memory size; give a KV budget (--kv_cache_gb) or --num_pages")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return max(0, int(free * fraction) - int(reserve_bytes))
