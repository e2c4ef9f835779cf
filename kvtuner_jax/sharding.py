"""Tensor and data parallelism: the mesh, partition specs of params / cache / batch, and the KV-head plan.

Mesh axes `("data", "model")` (DESIGN.md "Sharding"). The model axis is laid out fastest over the device list, which
is sorted by (process, device id), so model shards share a host (NVLink / ICI) whenever `model` divides a host's
device count and only the data axis crosses hosts.

Parameters (Megatron style, `x @ w` orientation):
- column-parallel on "model": wq, wk, wv (and their biases), w_gate, w_up;
- row-parallel on "model": wo, w_down (one all-reduce each per layer, inserted by XLA);
- embedding and LM head: vocabulary-parallel on "model" when vocab_size divides by the model axis, else replicated
  (vocabularies of real models are multiples of 64 or 128; odd test vocabularies stay replicated);
- norms replicated; everything replicated over "data".

KV heads (the cache is sharded over them, so every model shard must own whole KV heads with all their query heads).
`plan_heads` rewrites the attention weights into an equivalent model with H' KV heads, H' a multiple of the model
axis size M, by one stated rule:
- H % M == 0: as is, H/M KV heads per shard.
- H < M and M % H == 0: **replicate** every KV head r = M/H times (wk/wv columns copied; each shard holds exactly one
  copy and writes it itself, so no communication). The G = Hq/H query heads of a KV head are split over its r copies,
  ceil(G/r) per copy, padded with zero-weight query heads when r does not divide G.
- otherwise (e.g. SmolLM2's 3 KV heads over 2 or 4 shards): **pad** with zero-weight KV heads (and G zero-weight
  query heads each) up to the next multiple of M. A zero KV head stores zeros; its zero query heads attend to them
  and their output meets zero rows of wo, so it adds exactly 0.
The MLP width is zero-padded to a multiple of M the same way (silu(0) * 0 = 0 meets zero rows of w_down).
Real heads compute exactly what they compute on one device; only the order of the row-parallel sums changes.
The cost is memory: the cache holds H' heads (`HeadPlan.kv_heads`), which the page budget must use.

KV cache: pools `[H', N, ...]` and tails `[H', S, C, D]` are `P("model", "data")`: heads over model shards, physical
pages and sequence slots over data shards. Data shard d owns the contiguous page range `[d*N/Dd, (d+1)*N/Dd)` and
slot range `[d*S/Dd, (d+1)*S/Dd)`; the batch rows are split the same way (row b belongs to data shard `b // (B/Dd)`),
and each row's pages and slot must lie in its shard's ranges (`ShardedPageAllocator` hands them out;
`check_batch_placement` raises before a step otherwise). Page ids stay global on the host. The per-layer cache
operations (paged attention, tail attention, packed write, tail update) run under `shard_map` with no collectives;
the page table, lengths, new-token counts and slots are sharded over "data" with the batch rows.

Collectives of one compiled step (asserted on the HLO in tests/test_sharding.py): per layer one all-reduce over
"model" after wo and one after w_down (activations [rows, T, D]); one all-reduce for the vocab-parallel embedding
lookup (XLA's masked local gather + sum); all-gathers of the logits only (vocab shards over "model", rows over
"data"), because the step returns logits replicated so every process can read them. None moves cache data.

Multi-host (`kvtuner_jax.distributed`): every process runs the same host program (scheduler, allocator, sampler) on
the same host state; `put_global` transfers only the shards a process's devices hold, so each process feeds its
own batch rows, pages and slots, and the replicated logits are read locally on every process.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvtuner_jax.errors import CacheError, KVTunerError, ModelError
from kvtuner_jax.page_table import INVALID_PAGE, PageAllocator

AXES = ("data", "model")

# Logical axis -> mesh axis (the one place that says it). Shapes below name their logical axes in comments.
RULES = {
    "batch": "data",
    "kv_heads": "model",
    "q_heads": "model",
    "mlp": "model",
    "vocab": "model",  # only when divisible, else None (see param_specs)
    "pages": "data",
    "slots": "data",
    "embed": None,
    "head_dim": None,
}


class ShardingError(KVTunerError, ValueError):
    """A mesh or a placement does not fit: bad --mesh text, device count, or a size a mesh axis must divide."""


# ---------------------------------------------------------------------------------------------------------------
# Mesh


def parse_mesh_flag(text: str) -> dict[str, int]:
    """ "data=2,model=4" -> {"data": 2, "model": 4}. Missing axes are 1; one axis may be -1 (all remaining devices)."""
    sizes = {"data": 1, "model": 1}
    seen = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, val = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ShardingError(f"--mesh entry {part!r}: expected name=size with name in {AXES}, e.g. 'data=1,model=4'")
        if name in seen:
            raise ShardingError(f"--mesh names axis {name!r} twice in {text!r}")
        seen.add(name)
        try:
            size = int(val)
        except ValueError:
            raise ShardingError(f"--mesh entry {part!r}: size {val!r} is not an integer") from None
        if size == 0 or size < -1:
            raise ShardingError(f"--mesh entry {part!r}: size must be positive (or -1 = the remaining devices)")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise ShardingError(f"--mesh {text!r}: at most one axis may be -1")
    return sizes


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all devices of all processes), model axis fastest.

    One of data/model may be -1 to take all remaining devices. The device count must equal data * model.
    """
    devs = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    n = len(devs)
    if data == -1:
        data = n // model if model > 0 and n % model == 0 else 0
    if model == -1:
        model = n // data if data > 0 and n % data == 0 else 0
    if data <= 0 or model <= 0 or data * model != n:
        raise ShardingError(f"a mesh of data={data} x model={model} does not use exactly the {n} devices available")
    return Mesh(np.array(devs).reshape(data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def mesh_from_flag(text: str | None) -> Mesh | None:
    """The `--mesh` flag's value -> a Mesh; empty/None -> None (single-device path, no sharding at all)."""
    if text is None or not text.strip() or text.strip().lower() == "none":
        return None
    s = parse_mesh_flag(text)
    return make_mesh(s["data"], s["model"])


def mesh_sizes(mesh: Mesh | None) -> tuple[int, int]:
    """(data shards, model shards); (1, 1) without a mesh."""
    if mesh is None:
        return 1, 1
    return int(mesh.shape["data"]), int(mesh.shape["model"])


def define_mesh_flags(flag_values=None) -> None:
    """Defines --mesh, --coordinator_address, --num_processes, --process_id (absl) once."""
    from absl import flags

    fv = flag_values or flags.FLAGS
    if "mesh" in fv:
        return
    flags.DEFINE_string(
        "mesh",
        "",
        "Device mesh, e.g. 'data=1,model=4' (model = tensor parallel over KV heads; data = batch rows). "
        "One axis may be -1 (all remaining devices). Empty: one device, no sharding.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 for multi-host runs (else JAX_COORDINATOR_ADDRESS / cluster auto-detection).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes", None, "Processes in a multi-host run (else JAX_NUM_PROCESSES).", flag_values=fv
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index in [0, num_processes) (else JAX_PROCESS_ID).", flag_values=fv
    )


def init_distributed_from_flags(flag_values=None) -> bool:
    """jax.distributed.initialize from the flags / environment when a multi-process run is asked for.

    Call first thing in main(), before any other JAX call. Returns whether it initialized.
    """
    from absl import flags

    from kvtuner_jax import distributed

    fv = flag_values or flags.FLAGS
    return distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)


def mesh_from_flags(flag_values=None) -> Mesh | None:
    """`init_distributed_from_flags()` then `mesh_from_flag(--mesh)`: the one call an entry point needs."""
    from absl import flags

    fv = flag_values or flags.FLAGS
    init_distributed_from_flags(fv)
    return mesh_from_flag(fv.mesh)


# ---------------------------------------------------------------------------------------------------------------
# KV-head plan: replicate or pad heads so every model shard owns whole KV heads (module docstring).


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How H KV heads / Hq query heads map onto H' / Hq' heads for M model shards.

    kv_src[j]: original KV head that new KV head j copies, -1 for a zero (padding) head.
    q_src[i]: original query head that new query head i is, -1 for a zero head. New query head i reads new KV head
    i // (Hq' / H'), so GQA grouping is preserved; every original query head appears exactly once.
    mlp: padded MLP width. rule: "shard" | "replicate" | "pad".
    """

    model_shards: int
    rule: str
    kv_src: tuple[int, ...]
    q_src: tuple[int, ...]
    mlp: int

    @property
    def kv_heads(self) -> int:
        return len(self.kv_src)

    @property
    def q_heads(self) -> int:
        return len(self.q_src)

    @property
    def identity(self) -> bool:
        return self.rule == "shard" and all(s == i for i, s in enumerate(self.q_src))


def plan_heads(num_heads: int, num_kv_heads: int, intermediate_size: int, model_shards: int) -> HeadPlan:
    """The KV-head rule of the module docstring for H = num_kv_heads over M = model_shards."""
    h, hq, m = num_kv_heads, num_heads, model_shards
    if m < 1:
        raise ShardingError(f"model axis size must be >= 1, got {m}")
    if hq % h:
        raise ModelError(f"num_heads={hq} is not a multiple of num_kv_heads={h}")
    g = hq // h
    mlp = -(-intermediate_size // m) * m
    if h % m == 0:
        return HeadPlan(m, "shard", tuple(range(h)), tuple(range(hq)), mlp)
    if m % h == 0:
        r = m // h
        gp = -(-g // r)  # query heads per KV copy
        kv_src = tuple(kv for kv in range(h) for _ in range(r))
        q_src = tuple(
            kv * g + c * gp + i if c * gp + i < g else -1 for kv in range(h) for c in range(r) for i in range(gp)
        )
        return HeadPlan(m, "replicate", kv_src, q_src, mlp)
    hp = -(-h // m) * m
    kv_src = tuple(range(h)) + (-1,) * (hp - h)
    q_src = tuple(range(hq)) + (-1,) * ((hp - h) * g)
    return HeadPlan(m, "pad", kv_src, q_src, mlp)


def plan_for(cfg, model_shards: int) -> HeadPlan:
    return plan_heads(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, model_shards)


def padded_config(cfg, plan: HeadPlan):
    """The ModelConfig of the rewritten model (H', Hq', padded MLP width); everything else unchanged."""
    return dataclasses.replace(cfg, num_heads=plan.q_heads, num_kv_heads=plan.kv_heads, intermediate_size=plan.mlp)


def _take_heads(w, src: tuple[int, ...], head_dim: int, axis: int) -> np.ndarray:
    """Gathers head blocks of `w` along `axis` (size heads * head_dim) by `src`; -1 gives zeros. Host numpy."""
    w = np.asarray(w)
    idx = np.asarray(src)
    shape = list(w.shape)
    wh = w.reshape(shape[:axis] + [shape[axis] // head_dim, head_dim] + shape[axis + 1 :])
    out = np.take(wh, np.maximum(idx, 0), axis=axis)
    keep = (idx >= 0).reshape([-1 if a == axis else 1 for a in range(wh.ndim)])
    out = np.where(keep, out, np.zeros((), w.dtype))
    return out.reshape(shape[:axis] + [len(src) * head_dim] + shape[axis + 1 :])


def _pad_axis(w, axis: int, size: int) -> np.ndarray:
    w = np.asarray(w)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, size - w.shape[axis])
    return np.pad(w, pad)


def pad_params(params, cfg, plan: HeadPlan):
    """Params of `cfg` -> host (numpy) params of `padded_config(cfg, plan)` computing the same function.

    Done on the host so no device ever holds the unsharded, padded copy (module docstring for the rule).
    """
    from kvtuner_jax.model import LayerParams

    params = jax.tree.map(np.asarray, params)
    if plan.identity and plan.mlp == cfg.intermediate_size:
        return params
    hd = cfg.head_dim

    def layer(lp: LayerParams) -> LayerParams:
        col = lambda w, src: None if w is None else _take_heads(w, src, hd, w.ndim - 1)
        return dataclasses.replace(
            lp,
            wq=col(lp.wq, plan.q_src),
            wk=col(lp.wk, plan.kv_src),
            wv=col(lp.wv, plan.kv_src),
            bq=col(lp.bq, plan.q_src),
            bk=col(lp.bk, plan.kv_src),
            bv=col(lp.bv, plan.kv_src),
            wo=_take_heads(lp.wo, plan.q_src, hd, 0),
            w_gate=_pad_axis(lp.w_gate, 1, plan.mlp),
            w_up=_pad_axis(lp.w_up, 1, plan.mlp),
            w_down=_pad_axis(lp.w_down, 0, plan.mlp),
        )

    return dataclasses.replace(params, layers=tuple(layer(lp) for lp in params.layers))


# ---------------------------------------------------------------------------------------------------------------
# Partition specs


def param_specs(cfg, model_shards: int):
    """PartitionSpecs for the params of (padded) `cfg`, as a `Params` tree (module docstring for the rules)."""
    from kvtuner_jax.model import LayerParams, Params

    m = model_shards
    for name, n in (("num_kv_heads", cfg.num_kv_heads), ("num_heads", cfg.num_heads), ("mlp", cfg.intermediate_size)):
        if n % m:
            raise ShardingError(f"{name}={n} does not divide over model={m}: pad the config with plan_heads first")
    vocab = RULES["vocab"] if cfg.vocab_size % m == 0 and m > 1 else None
    col_w = P(RULES["embed"], RULES["q_heads"])  # [D, heads * hd]
    row_w = P(RULES["q_heads"], RULES["embed"])  # [heads * hd, D]
    col_b = P(RULES["q_heads"])  # [heads * hd]
    bias = col_b if cfg.qkv_bias else None
    lp = LayerParams(
        attn_norm=P(),
        wq=col_w,
        wk=col_w,
        wv=col_w,
        wo=row_w,
        mlp_norm=P(),
        w_gate=P(None, RULES["mlp"]),  # [D, F]
        w_up=P(None, RULES["mlp"]),
        w_down=P(RULES["mlp"], None),  # [F, D]
        bq=bias,
        bk=bias,
        bv=bias,
    )
    return Params(
        embed=P(vocab, None),  # [V, D]
        layers=tuple(lp for _ in range(cfg.num_layers)),
        final_norm=P(),
        lm_head=None if cfg.tie_word_embeddings else P(None, vocab),  # [D, V]
    )


def cache_specs(cache):
    """PartitionSpecs for a KVCache (or its abstract shape): every pool and tail array `P("model", "data")`."""
    return jax.tree.map(lambda _: P(RULES["kv_heads"], RULES["pages"]), cache)


def batch_specs():
    """PartitionSpecs for a BatchInfo: every field split over "data" by row."""
    from kvtuner_jax.cache import BatchInfo

    return BatchInfo(page_table=P(RULES["batch"], None), lengths=P("data"), num_new=P("data"), slots=P("data"))


def named(mesh: Mesh, specs):
    """PartitionSpec tree -> NamedSharding tree (PartitionSpec is a pytree leaf here)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params, cfg, mesh: Mesh):
    """Rewrites params by the KV-head plan for this mesh and places them Megatron-style.

    Returns (plan, padded cfg, placed params). Use the padded cfg with `model.forward` / any jitted pass (dense,
    decode-faithful): XLA partitions plain-jnp attention over the head axis by itself; only the paged cache needs
    `PagedAttention(mesh=...)`. Every process calls this with the same params (each places only its shards).
    """
    _, m = mesh_sizes(mesh)
    plan = plan_for(cfg, m)
    run_cfg = padded_config(cfg, plan)
    shardings = named(mesh, param_specs(run_cfg, m))
    return plan, run_cfg, jax.tree.map(put_global, pad_params(params, cfg, plan), shardings)


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """A host value (numpy, or a single-process jax array) -> a global array with `sharding`.

    Every process calls this with the same global value; each transfers only the shards its devices hold.
    An array that already has this sharding is returned as is.
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# ---------------------------------------------------------------------------------------------------------------
# Data-parallel placement: rows, pages and slots of one data shard.


def check_divisible(what: str, n: int, data: int) -> None:
    if n % data:
        raise ShardingError(f"{what}={n} does not divide over data={data} shards")


def data_shard_of_row(row: int, batch: int, data: int) -> int:
    return row // (batch // data)


def data_shard_of_slot(slot: int, max_seqs: int, data: int) -> int:
    return slot // (max_seqs // data)


def check_batch_placement(page_table, slots, num_new, num_pages: int, max_seqs: int, data: int) -> None:
    """Raises CacheError unless every live row's pages and slot lie in its data shard's ranges (module docstring).

    page_table [B, max_pages], slots [B], num_new [B]: host arrays. Rows with num_new == 0 and no pages are padding.
    """
    if data == 1:
        return
    pt, sl, nn = np.asarray(page_table), np.asarray(slots), np.asarray(num_new)
    b = pt.shape[0]
    check_divisible("batch rows", b, data)
    rows, npg, nsl = b // data, num_pages // data, max_seqs // data
    d = np.arange(b) // rows  # data shard of each row (vectorized: this runs every step)
    listed = pt != INVALID_PAGE
    off = listed & ((pt < (d * npg)[:, None]) | (pt >= ((d + 1) * npg)[:, None]))
    if off.any():
        r = int(np.argmax(off.any(axis=1)))
        raise CacheError(
            f"row {r} (data shard {d[r]}) lists pages {pt[r][off[r]].tolist()} outside its shard's pages "
            f"[{d[r] * npg}, {(d[r] + 1) * npg}); allocate with ShardedPageAllocator"
        )
    live = (nn > 0) | listed.any(axis=1)
    bad = live & ((sl < d * nsl) | (sl >= (d + 1) * nsl))
    if bad.any():
        r = int(np.argmax(bad))
        raise CacheError(
            f"row {r} (data shard {d[r]}) uses slot {sl[r]} outside its shard's slots "
            f"[{d[r] * nsl}, {(d[r] + 1) * nsl})"
        )


class ShardedPageAllocator:
    """One free list per data shard over its contiguous range of global page ids (lowest ids first)."""

    def __init__(self, num_pages: int, data: int = 1):
        check_divisible("num_pages", num_pages, data)
        self.num_pages, self.data = num_pages, data
        self.per_shard = num_pages // data
        self._allocs = [PageAllocator(self.per_shard) for _ in range(data)]

    @property
    def num_free(self) -> int:
        return sum(a.num_free for a in self._allocs)

    def num_free_in(self, shard: int) -> int:
        return self._allocs[shard].num_free

    def allocate(self, n: int, shard: int = 0) -> list[int]:
        off = shard * self.per_shard
        return [off + p for p in self._allocs[shard].allocate(n)]

    def free(self, pages: list[int]) -> None:
        for pg in pages:
            if not 0 <= pg < self.num_pages:
                raise CacheError(f"page {pg} is not allocated (outside 0..{self.num_pages - 1})")
            self._allocs[pg // self.per_shard].free([pg % self.per_shard])


def localize_batch(page_table, slots, num_new, num_pages_local: int, max_seqs_local: int):
    """Inside shard_map: global page ids / slots of this data shard's rows -> local ones.

    Ids outside the shard's range become INVALID_PAGE (never read as another shard's page); a row whose slot is
    outside the range becomes a padding row (num_new 0, slot -1). `check_batch_placement` rejects such input on the
    host; this keeps the device side safe regardless.
    """
    d = jax.lax.axis_index(RULES["pages"])
    pt = page_table - d * num_pages_local
    pt = jnp.where((page_table >= 0) & (pt >= 0) & (pt < num_pages_local), pt, INVALID_PAGE)
    sl = slots - d * max_seqs_local
    ok = (sl >= 0) & (sl < max_seqs_local)
    return pt.astype(page_table.dtype), jnp.where(ok, sl, -1), jnp.where(ok, num_new, 0)


def expected_collectives(hlo_text: str) -> dict[str, int]:
    """Counts of cross-device collectives in compiled HLO text (tests and reports)."""
    names = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    out = {}
    for n in names:
        out[n] = sum(1 for line in hlo_text.splitlines() if f" {n}(" in line or f" {n}-start(" in line)
    return out


def describe(mesh: Mesh | None, cfg) -> str:
    """One line for logs: mesh sizes and the head rule."""
    if mesh is None:
        return "mesh: none (one device)"
    d, m = mesh_sizes(mesh)
    plan = plan_for(cfg, m)
    vocab = "vocab-parallel" if cfg.vocab_size % m == 0 and m > 1 else "replicated"
    return (
        f"mesh: data={d} model={m} over {mesh.devices.size} devices in {jax.process_count()} process(es); "
        f"KV heads {cfg.num_kv_heads}->{plan.kv_heads} ({plan.rule}), query heads {cfg.num_heads}->{plan.q_heads}, "
        f"embedding {vocab}"
    )
