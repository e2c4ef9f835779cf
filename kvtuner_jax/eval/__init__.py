"""Batch evaluation of KV manifests against the 16-bit model: `python -m kvtuner_jax.eval` (see __main__.py).

Tasks (every quantized number is computed with decode semantics: token t sees token j dequantized iff j < Q(t), the
way a decode step would see it; `kvtuner_jax.faithful` computes that in one parallel pass, no full-precision prefill):
- perplexity: exp(mean NLL) of the text windows (every token after the first of each window is scored).
- kl: mean KL(p_16bit || p_manifest) over the same positions, and the teacher-forced top-1 match of next-token argmaxes.
- agreement: the 16-bit model's greedy continuation of a prompt, scored teacher-forced under the manifest: `agreement`
  is the fraction of its positions where the manifest's argmax is the 16-bit token, `greedy_prefix` the fraction of
  the continuation the manifest's own greedy decode reproduces before its first different token (teacher forcing
  on the reference is exact up to that point, so this is the free-running greedy match, computed in one pass).
- passkey: a 5-digit number hidden at several depths of essay text, lengths up to the model's context; a sample
  passes when greedy decoding after "The pass key is" would produce exactly its digits (teacher-forced argmaxes).

`path="engine"` computes the logits instead by feeding each row token by token through the paged cache
(`runtime.ModelRunner`, decode steps, kernels chosen by `backend`): slow, for cross-checking kernels against the
faithful pass. Everything is deterministic for a fixed seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import faithful, planner
from kvtuner_jax import manifest as mf
from kvtuner_jax.errors import AssetError, KVTunerError
from kvtuner_jax.model import ModelConfig, Params, logits_dense
from kvtuner_jax.specs import LayerSpec

TASKS = ("perplexity", "kl", "agreement", "passkey")
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    seq_len: int = 1024  # tokens per perplexity / KL window
    num_windows: int = 8
    batch_size: int = 2  # rows per forward pass
    page_size: int = 32
    agreement_prompts: int = 4
    agreement_prompt_len: int = 128
    agreement_new_tokens: int = 32
    passkey_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_trials: int = 1  # samples per (length, depth)
    seed: int = 0
    path: str = "faithful"  # or "engine" (token-by-token through the paged cache)
    backend: str = "auto"  # kernels of the engine path
    interpret: bool = False
    reuse_reference_for_16bit: bool = True  # an all-16-bit manifest's logits are the reference's (faithful == dense)

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise KVTunerError(f"unknown task {bad[0]!r}; expected some of {', '.join(TASKS)}")
        if self.path not in ("faithful", "engine"):
            raise KVTunerError(f"path must be 'faithful' or 'engine', got {self.path!r}")


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    tokens: np.ndarray  # [L] int32: intro, filler with the needle at `depth`, question, answer digits
    answer_start: int  # index of the first answer token
    answer_len: int
    length: int
    depth: float
    key: int


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Token inputs of every task (built from texts by `build_data`, or directly in tests)."""

    windows: np.ndarray  # [num_windows, seq_len] int32
    agreement_prompts: np.ndarray  # [A, prompt_len] int32
    passkey: tuple[PasskeySample, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def load_texts(paths: Sequence[str] = (), split: str = "heldout") -> list[str]:
    """Texts from .txt files, directories of them, or JSONL files (a string or {"text": ...} per line).

    With no paths: the embedded essays; split "heldout" = odd-indexed files (the search calibrates on the even
    ones), "calib" = even-indexed, "all".
    """
    from kvtuner_jax import assets

    if not paths:
        texts = assets.essay_texts()
        return {"heldout": texts[1::2], "calib": texts[0::2], "all": texts}[split]
    out = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.txt")) + sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise AssetError(f"text input {p} does not exist or holds no .txt/.jsonl files")
        for f in files:
            if f.suffix == ".jsonl":
                out += assets.read_jsonl_strings(f, "text")
            else:
                out.append(f.read_text(encoding="utf-8", errors="replace"))
    return out


def make_windows(token_lists: Sequence[Sequence[int]], seq_len: int, num: int, seed: int) -> np.ndarray:
    """[num, seq_len] windows: every text cut into whole non-overlapping windows, `num` of them drawn without
    replacement by `seed` (kept in corpus order)."""
    chunks = [ids[i : i + seq_len] for ids in token_lists for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if len(chunks) < num:
        raise AssetError(f"the texts give {len(chunks)} windows of {seq_len} tokens; {num} were asked for")
    idx = np.sort(np.random.default_rng(seed).choice(len(chunks), num, replace=False))
    return np.asarray([chunks[i] for i in idx], np.int32)


def passkey_samples(tok, filler: Sequence[int], cfg: EvalConfig) -> list[PasskeySample]:
    """One sample per (length, depth, trial): intro + filler (needle at that depth of it) + question + answer."""
    rng = np.random.default_rng(cfg.seed + 1)
    intro = tok.encode(PASSKEY_INTRO)
    question = tok.encode(PASSKEY_QUESTION, add_bos=False)
    out = []
    for length in cfg.passkey_lengths:
        for depth in cfg.passkey_depths:
            for _ in range(cfg.passkey_trials):
                key = int(rng.integers(10000, 100000))
                needle = tok.encode(PASSKEY_NEEDLE.format(key=key), add_bos=False)
                answer = tok.encode(f" {key}", add_bos=False)
                n_fill = length - len(intro) - len(needle) - len(question) - len(answer)
                if n_fill < 0:
                    raise KVTunerError(f"passkey length {length} is too short for the prompt itself")
                if n_fill > len(filler):
                    raise AssetError(f"the texts give {len(filler)} filler tokens; passkey length {length} needs more")
                start = int(rng.integers(0, len(filler) - n_fill + 1))
                fill = list(filler[start : start + n_fill])
                cut = int(round(depth * n_fill))
                toks = intro + fill[:cut] + needle + fill[cut:] + question + answer
                out.append(
                    PasskeySample(np.asarray(toks, np.int32), len(toks) - len(answer), len(answer), length, depth, key)
                )
    return out


def greedy_continuations(params: Params, cfg: ModelConfig, prompts: np.ndarray, n: int) -> np.ndarray:
    """The 16-bit model's greedy continuation: [A, P] -> [A, P + n] (dense attention, one fixed shape)."""
    a, p = prompts.shape
    toks = np.zeros((a, p + n), np.int32)
    toks[:, :p] = prompts
    for t in range(p, p + n):
        logits = _dense(params, cfg, jnp.asarray(toks))
        toks[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    return toks


def build_data(tok, texts: Sequence[str], params: Params, model_cfg: ModelConfig, cfg: EvalConfig) -> EvalData:
    """Tokenizes texts into the inputs of every task in cfg.tasks (agreement references need the 16-bit model)."""
    ids = [tok.encode(t) for t in texts]
    windows = np.zeros((0, cfg.seq_len), np.int32)
    if "perplexity" in cfg.tasks or "kl" in cfg.tasks:
        windows = make_windows(ids, cfg.seq_len, cfg.num_windows, cfg.seed)
    prompts = np.zeros((0, cfg.agreement_prompt_len + cfg.agreement_new_tokens), np.int32)
    if "agreement" in cfg.tasks:
        starts = make_windows(ids, cfg.agreement_prompt_len, cfg.agreement_prompts, cfg.seed + 2)
        prompts = greedy_continuations(params, model_cfg, starts, cfg.agreement_new_tokens)
    passkey = ()
    if "passkey" in cfg.tasks:
        limit = model_cfg.max_position_embeddings
        too_long = [n for n in cfg.passkey_lengths if n > limit]
        if too_long:
            raise KVTunerError(f"passkey length {too_long[0]} exceeds the model's context of {limit}")
        filler = [t for x in ids for t in x]
        passkey = tuple(passkey_samples(tok, filler, cfg))
    return EvalData(windows, prompts, passkey)


# ---------------------------------------------------------------------------------------------------------------
# Logits under a manifest


_dense = jax.jit(logits_dense, static_argnums=1)


def faithful_or_reference(params, cfg, tokens, specs, page_size, ecfg: EvalConfig) -> jnp.ndarray:
    """Logits [B, T, V] of `tokens` under `specs` by ecfg.path (an all-16-bit spec may take the dense shortcut)."""
    if ecfg.reuse_reference_for_16bit and _is_16bit(specs):
        return _dense(params, cfg, jnp.asarray(tokens))
    if ecfg.path == "engine":
        return engine_logits(params, cfg, tokens, specs, page_size, ecfg.backend, ecfg.interpret)
    return faithful.faithful_logits(params, cfg, jnp.asarray(tokens), specs, page_size)


def engine_logits(params, cfg, tokens, specs, page_size, backend="auto", interpret=False) -> jnp.ndarray:
    """Logits [B, T, V] of rows fed token by token through the paged cache (decode steps, exact decode semantics)."""
    from kvtuner_jax import cache as kc
    from kvtuner_jax.page_table import PageAllocator, SequencePages
    from kvtuner_jax.runtime import ModelRunner, make_batch

    tokens = np.asarray(tokens, np.int32)
    b, t = tokens.shape
    min_r = min(s.residual_length for s in specs)
    max_pages = max(1, (t - min_r) // page_size)
    dtype = "bfloat16" if cfg.dtype == "bfloat16" else "float32"
    cc = kc.CacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size, b * max_pages, b, dtype)
    runner = ModelRunner(cfg, params, tuple(specs), cc, backend=backend, interpret=interpret)
    cache = runner.init_cache()
    alloc = PageAllocator(cc.num_pages)
    seqs = [SequencePages(slot=i) for i in range(b)]
    out = []
    for i in range(t):
        for s in seqs:
            s.pages += alloc.allocate(runner.pages_for(s.length + 1) - len(s.pages))
        logits, cache = runner.step(cache, tokens[:, i : i + 1], make_batch(seqs, [1] * b, max_pages))
        out.append(logits)
        for s in seqs:
            s.length += 1
    return jnp.stack(out, axis=1)


@jax.jit
def _window_sums(logits_q, logits_ref, tokens):
    """Per-row sums over predicted positions: (nll, kl, top-1 match, count)."""
    nll = faithful.token_nll(logits_q, tokens)  # [B, T-1]
    kl = faithful.kl_per_token(logits_q, logits_ref)
    top1 = jnp.argmax(logits_q[:, :-1], -1) == jnp.argmax(logits_ref[:, :-1], -1)
    return nll.sum(1), kl.sum(1), top1.sum(1), jnp.full(nll.shape[:1], nll.shape[1])


@partial(jax.jit, static_argnums=(2,))
def _continuation_argmax(logits, tokens, start: int):
    """Argmax at positions start-1 .. T-2 (they predict tokens start .. T-1) and those tokens."""
    return jnp.argmax(logits[:, start - 1 : -1], -1), tokens[:, start:]


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _is_16bit(specs: Sequence[LayerSpec]) -> bool:
    return all(not s.k.quantized and not s.v.quantized for s in specs)


@dataclasses.dataclass
class ManifestEntry:
    name: str
    specs: tuple[LayerSpec, ...]
    source: str | None = None
    manifest: mf.Manifest | None = None


def entry_of(name: str, m) -> ManifestEntry:
    if isinstance(m, mf.Manifest):
        return ManifestEntry(name, tuple(m.layer_specs()), m.source, m)
    return ManifestEntry(name, tuple(m))


def evaluate(
    params: Params,
    cfg: ModelConfig,
    manifests: Sequence[ManifestEntry],
    data: EvalData,
    ecfg: EvalConfig,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Runs every task of ecfg on every manifest; returns one result dict per manifest (in order).

    progress(n): called with the number of finished forward passes (for a progress bar; see `count_passes`).
    """
    tick = progress or (lambda n: None)
    acc = {e.name: dict(nll=0.0, kl=0.0, top1=0.0, n=0) for e in manifests}
    t0 = time.perf_counter()
    want_windows = ("perplexity" in ecfg.tasks or "kl" in ecfg.tasks) and len(data.windows)
    if want_windows:
        for sl in _batches(len(data.windows), ecfg.batch_size):
            toks = jnp.asarray(data.windows[sl])
            ref = _dense(params, cfg, toks)
            for e in manifests:
                if ecfg.reuse_reference_for_16bit and _is_16bit(e.specs):
                    q = ref
                else:
                    q = faithful_or_reference(params, cfg, toks, e.specs, ecfg.page_size, ecfg)
                nll, kl, top1, n = (np.asarray(x, np.float64) for x in _window_sums(q, ref, toks))
                a = acc[e.name]
                a["nll"] += nll.sum()
                a["kl"] += kl.sum()
                a["top1"] += top1.sum()
                a["n"] += int(n.sum())
                tick(1)
    agree = {}
    if "agreement" in ecfg.tasks and len(data.agreement_prompts):
        rows = data.agreement_prompts
        start = ecfg.agreement_prompt_len
        for e in manifests:
            match, prefix = [], []
            for sl in _batches(len(rows), ecfg.batch_size):
                q = faithful_or_reference(params, cfg, rows[sl], e.specs, ecfg.page_size, ecfg)
                am, ref = (np.asarray(x) for x in _continuation_argmax(q, jnp.asarray(rows[sl]), start))
                eq = am == ref  # [B, n]
                match += list(eq.mean(1))
                first_miss = np.where(eq.all(1), eq.shape[1], np.argmin(eq, axis=1))
                prefix += list(first_miss / eq.shape[1])
                tick(1)
            agree[e.name] = (float(np.mean(match)), float(np.mean(prefix)))
    keys = {}
    if "passkey" in ecfg.tasks and data.passkey:
        by_len: dict[int, list[PasskeySample]] = {}
        for s in data.passkey:
            by_len.setdefault(len(s.tokens), []).append(s)
        for e in manifests:
            res = []
            for _, group in sorted(by_len.items()):
                toks = np.stack([s.tokens for s in group])
                for sl in _batches(len(group), ecfg.batch_size):
                    q = faithful_or_reference(params, cfg, toks[sl], e.specs, ecfg.page_size, ecfg)
                    for s, lg in zip(group[sl], np.asarray(_passkey_argmax(q, group[sl])), strict=True):
                        ok = bool(np.all(lg == s.tokens[s.answer_start : s.answer_start + s.answer_len]))
                        res.append((s.length, s.depth, ok))
                    tick(1)
            keys[e.name] = res
    out = []
    for e in manifests:
        r: dict = {"manifest": e.name, "source": e.source}
        r.update(_bits(e, cfg, ecfg.page_size))
        a = acc[e.name]
        if a["n"]:
            if "perplexity" in ecfg.tasks:
                r["perplexity"] = math.exp(a["nll"] / a["n"])
                r["nll"] = a["nll"] / a["n"]
            if "kl" in ecfg.tasks:
                r["kl"] = a["kl"] / a["n"]
                r["top1_teacher_forced"] = a["top1"] / a["n"]
            r["tokens_scored"] = a["n"]
        if e.name in agree:
            r["agreement"], r["greedy_prefix"] = agree[e.name]
        if e.name in keys:
            res = keys[e.name]
            r["passkey"] = float(np.mean([ok for *_, ok in res]))
            r["passkey_by_length"] = {
                str(n): float(np.mean([ok for ln, _, ok in res if ln == n])) for n in sorted({x[0] for x in res})
            }
            r["passkey_samples"] = len(res)
        out.append(r)
    ref16 = next((r for r in out if r.get("effective_bits_nominal") == 16.0 and "perplexity" in r), None)
    for r in out:
        if ref16 is not None and "perplexity" in r:
            r["ppl_change_vs_16bit"] = r["perplexity"] / ref16["perplexity"] - 1
        r["config"] = {**dataclasses.asdict(ecfg), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _passkey_argmax(logits, samples: Sequence[PasskeySample]) -> np.ndarray:
    """Argmax at the positions predicting each sample's answer tokens: [B, answer_len]."""
    lg = np.asarray(jnp.argmax(logits, -1))  # [B, T]
    return np.stack([lg[i, s.answer_start - 1 : s.answer_start - 1 + s.answer_len] for i, s in enumerate(samples)])


def _bits(e: ManifestEntry, cfg: ModelConfig, page_size: int) -> dict:
    from kvtuner_jax import cache as kc

    cc = kc.CacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size, 1, 1, "bfloat16")
    nominal = float(np.mean([(s.k.bits + s.v.bits) / 2 for s in e.specs]))
    return {"effective_bits": planner.effective_bits(e.specs, cc), "effective_bits_nominal": nominal}


def count_passes(data: EvalData, ecfg: EvalConfig, num_manifests: int) -> int:
    """Forward passes `evaluate` will report through `progress`."""
    n = 0
    if ("perplexity" in ecfg.tasks or "kl" in ecfg.tasks) and len(data.windows):
        n += math.ceil(len(data.windows) / ecfg.batch_size) * num_manifests
    if "agreement" in ecfg.tasks:
        n += math.ceil(len(data.agreement_prompts) / ecfg.batch_size) * num_manifests
    if "passkey" in ecfg.tasks:
        sizes: dict[int, int] = {}
        for s in data.passkey:
            sizes[len(s.tokens)] = sizes.get(len(s.tokens), 0) + 1
        n += sum(math.ceil(c / ecfg.batch_size) for c in sizes.values()) * num_manifests
    return n


# ---------------------------------------------------------------------------------------------------------------
# Reports


def summary_table(results: Sequence[dict], console=None, title: str = "KV manifests vs the 16-bit model") -> str:
    """Prints a rich table (to `console`, default stdout) and returns the same as a Markdown table."""
    from rich.console import Console
    from rich.table import Table

    cols = [
        ("manifest", lambda r: r["manifest"]),
        ("eff. bits", lambda r: f"{r['effective_bits']:.2f}"),
        ("ppl", lambda r: f"{r['perplexity']:.3f}" if "perplexity" in r else ""),
        ("Δppl", lambda r: f"{100 * r['ppl_change_vs_16bit']:+.2f}%" if "ppl_change_vs_16bit" in r else ""),
        ("KL (nats)", lambda r: f"{r['kl']:.5f}" if "kl" in r else ""),
        ("top-1", lambda r: f"{100 * r['top1_teacher_forced']:.1f}%" if "top1_teacher_forced" in r else ""),
        ("greedy agree", lambda r: f"{100 * r['agreement']:.1f}%" if "agreement" in r else ""),
        ("greedy prefix", lambda r: f"{100 * r['greedy_prefix']:.1f}%" if "greedy_prefix" in r else ""),
        ("passkey", lambda r: f"{100 * r['passkey']:.0f}%" if "passkey" in r else ""),
    ]
    cols = [(n, f) for n, f in cols if any(f(r) for r in results)]
    table = Table(title=title)
    for n, _ in cols:
        table.add_column(n, justify="left" if n == "manifest" else "right", no_wrap=True)
    rows = [[f(r) for _, f in cols] for r in results]
    for row in rows:
        table.add_row(*row)
    (console or Console(width=160)).print(table)
    md = ["| " + " | ".join(n for n, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(md)


def plot(results: Sequence[dict], path: str | Path, title: str = "") -> None:
    """PNG: perplexity and KL against effective bits, one labelled point per manifest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("perplexity", "kl", "agreement", "passkey") if any(m in r for r in results)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        pts = [(r["effective_bits"], r[m], r["manifest"]) for r in results if m in r]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("effective bits per K/V element (incl. scales)")
        ax.set_ylabel(m)
        if m == "kl" and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "quality against effective bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_jsonl(results: Sequence[dict], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
