"""The whole search as one library call: profile -> prune -> cluster -> NSGA-II -> manifests (+ held-out table)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvtuner_jax import manifest as manifest_lib
from kvtuner_jax.search import optimize, plots
from kvtuner_jax.search.profile import Calibration, Profile, make_windows, profile_layers, split_halves
from kvtuner_jax.search.space import Scheme, effective_bits, make_scheme, nominal_bits


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Every knob of one search run (the CLI's flags)."""

    out_dir: str
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    model_name: str | None = None  # manifest model name; default "SmolLM2-135M-Instruct" for the embedded model
    scheme: str = "kivi"
    page_size: int = 0  # 0: the scheme's default
    bits: tuple[int, ...] = (16, 8, 4, 2)
    seq_len: int = 512
    num_windows: int = 8
    heldout_windows: int = 8
    heldout_seq_len: int = 0  # 0: seq_len
    heldout_front: int = 0  # front manifests in the held-out table (evenly spaced, top included); 0: all
    calib_half: str = "even"
    num_groups: int = 6
    trials: int = 100
    population: int = 24
    seed: int = 0
    max_avg_bits: float = 4.0
    budget_kind: str = "nominal"
    storage: str | None = None  # default sqlite:///<out_dir>/study.db
    study_name: str | None = None
    profile_batch: int = 1
    reuse_profile: bool = True


def _save(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def model_identity(cfg, name: str) -> manifest_lib.ModelIdentity:
    return manifest_lib.ModelIdentity(name, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)


def build_manifest(identity, scheme: Scheme, layer_pairs, metadata: dict | None = None) -> manifest_lib.Manifest:
    """A per-layer manifest in the scheme's layout, through the manifest module (so it validates)."""
    settings = {k: v for k, v in scheme.defaults_json().items()}
    return manifest_lib.mixed(identity, [tuple(p) for p in layer_pairs], metadata=metadata, **settings)


def run(config: SearchConfig, params=None, cfg=None, tokenizer=None, texts=None, log: Callable = print) -> dict:
    """Runs the search and writes everything under config.out_dir. Returns the summary (also summary.json).

    params/cfg/tokenizer/texts may be given (tests); otherwise the model is loaded from config.model and the text is
    the essays. Calibration uses the `calib_half` of the texts (even/odd file index), held-out the other half.
    """
    from kvtuner_jax import assets, weights

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    if params is None:
        cfg, params, tokenizer = weights.load_model(config.model, progress=False)
    name = config.model_name or ("SmolLM2-135M-Instruct" if config.model is None and texts is None else cfg.name)
    identity = model_identity(cfg, name)
    scheme = make_scheme(config.scheme, cfg.head_dim, config.page_size or None)
    texts = assets.essay_texts() if texts is None else texts
    even, odd = split_halves(texts)
    calib_texts, held_texts = (even, odd) if config.calib_half == "even" else (odd, even)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    windows = make_windows(tokenizer, calib_texts, config.seq_len, config.num_windows)
    calib = Calibration.build(params, cfg, windows)
    timings["reference_pass"] = time.perf_counter() - t0
    data = {
        "text": "essays" if config.model is None else "given",
        "half": config.calib_half,
        "seq_len": config.seq_len,
        "num_windows": config.num_windows,
    }

    # 1. Profile
    pairs = [(k, v) for k in config.bits for v in config.bits]
    settings = {"scheme": dataclasses.asdict(scheme), "pairs": [list(p) for p in pairs], "data": data}
    prof_path = out / "profile.json"
    prof = None
    if config.reuse_profile and prof_path.exists():
        saved = json.loads(prof_path.read_text())
        if saved.get("settings") == settings:
            prof = Profile.from_json(saved)
            log(f"profile: reused {prof_path}")
    if prof is None:
        prof = profile_layers(calib, scheme, pairs, batch=config.profile_batch, log=log)
        _save(prof_path, {"settings": settings, "model": name, **prof.to_json()})
        (out / "profile.csv").write_text(prof.to_csv())
    timings["profile"] = prof.seconds

    # 2-3. Prune and cluster
    space, keep = optimize.build_space(prof.losses, prof.pairs, scheme, cfg.head_dim, config.num_groups, config.seed)
    pareto_per_layer = [[list(prof.pairs[c]) for c in np.flatnonzero(row)] for row in keep]
    plots.heatmap(out / "profile_heatmap.png", prof.losses, prof.pairs, f"{name}, {scheme.name}", space.groups)

    # 4. NSGA-II
    t0 = time.perf_counter()

    def evaluate(lp):
        return calib.evaluate([scheme.layer_spec(*p) for p in lp], scheme.page_size)["kl"]

    def budget(lp):
        b = nominal_bits(lp) if config.budget_kind == "nominal" else effective_bits(lp, scheme, cfg.head_dim)
        return b - config.max_avg_bits

    def pair_bits(p):
        return (p[0] + p[1]) / 2 if config.budget_kind == "nominal" else scheme.pair_bits(*p, cfg.head_dim)

    space = optimize.restrict_to_budget(space, pair_bits, config.max_avg_bits)
    _save(out / "space.json", {**space.to_json(), "pareto_pairs_per_layer": pareto_per_layer})
    seeds = optimize.greedy_seeds(space, prof.losses, prof.pairs, scheme, cfg.head_dim, budget)
    result = optimize.run_search(
        space,
        evaluate,
        scheme=scheme,
        head_dim=cfg.head_dim,
        max_avg_bits=config.max_avg_bits,
        budget_kind=config.budget_kind,
        trials=config.trials,
        seed=config.seed,
        storage=config.storage or f"sqlite:///{(out / 'study.db').resolve()}",
        study_name=config.study_name or f"{name}-{scheme.name}",
        seed_points=seeds,
        estimate=lambda lp: optimize.additive_estimate(lp, prof.losses, prof.pairs),
        population_size=config.population,
        log=log,
    )
    timings["search"] = time.perf_counter() - t0

    # Uniform references on the calibration windows (for the plot and the summary)
    refs = {}
    for kb, vb in pairs:
        lp = [(kb, vb)] * cfg.num_layers
        refs[f"{kb}/{vb}"] = (effective_bits(lp, scheme, cfg.head_dim), evaluate(lp) if (kb, vb) != (16, 16) else 0.0)
    plots.pareto(
        out / "pareto.png",
        result.evaluated,
        result.front,
        {k: v for k, v in refs.items() if v[1] > 0 and v[0] <= 1.5 * max(p.effective_bits for p in result.evaluated)},
        f"{name}, {scheme.name}: calibration KL (budget {config.max_avg_bits} {config.budget_kind} bits)",
    )

    # 5. Manifests of the front
    mdir = out / "manifests"
    mdir.mkdir(exist_ok=True)
    emitted = []
    for p in result.front:
        meta = optimize.provenance(
            tool="python -m kvtuner_jax.search",
            model=name,
            data={**data, "windows": "evenly spaced whole windows of the half, file order"},
            seed=config.seed,
            scheme=scheme.name,
            page_size=scheme.page_size,
            num_groups=config.num_groups,
            trials=result.n_trials,
            trial=p.trial,
            max_avg_bits=config.max_avg_bits,
            budget_kind=config.budget_kind,
            loss={"metric": "mean KL vs 16-bit, decode-faithful, calibration windows (nats)", "value": p.loss},
            nominal_bits=p.nominal_bits,
            effective_bits=p.effective_bits,
        )
        m = build_manifest(identity, scheme, p.layer_pairs, meta)
        path = mdir / f"{scheme.name}-{p.nominal_bits:.3f}bits-trial{p.trial}.json"
        m.save(path)
        emitted.append({"path": str(path), **p.to_json()})
    _save(out / "pareto.json", {"front": emitted, "evaluated": [p.to_json() for p in result.evaluated]})

    summary = {
        "model": name,
        "scheme": dataclasses.asdict(scheme),
        "config": dataclasses.asdict(config),
        "groups": [list(g) for g in space.groups],
        "n_trials": result.n_trials,
        "front": emitted,
        "uniform_calibration": {k: {"effective_bits": b, "kl": l} for k, (b, l) in refs.items()},
        "timings_s": timings,
    }

    # Held-out table
    if config.heldout_windows > 0:
        t0 = time.perf_counter()
        held = Calibration.build(
            params, cfg, make_windows(tokenizer, held_texts, config.seq_len, config.heldout_windows)
        )
        rows = []
        candidates = [(f"uniform {kb}/{vb}", [(kb, vb)] * cfg.num_layers) for kb, vb in pairs]
        chosen = emitted
        if 0 < config.heldout_front < len(emitted):  # evenly spaced along the front, always including the top
            n = len(emitted)
            chosen = [
                emitted[n - 1 - round(i * (n - 1) / (config.heldout_front - 1 or 1))]
                for i in range(config.heldout_front)
            ]
            chosen = sorted({id(e): e for e in chosen}.values(), key=lambda e: e["nominal_bits"])
        candidates += [(Path(e["path"]).name, [tuple(x) for x in e["layer_pairs"]]) for e in chosen]
        for label, lp in candidates:
            r = held.evaluate([scheme.layer_spec(*p) for p in lp], scheme.page_size)
            rows.append({
                "config": label,
                "nominal_bits": nominal_bits(lp),
                "effective_bits": effective_bits(lp, scheme, cfg.head_dim),
                "perplexity": float(np.exp(r["nll"])),
                "kl": r["kl"],
                "top1": r["top1"],
            })  # fmt: skip
        timings["heldout"] = time.perf_counter() - t0
        summary["heldout"] = rows
        (out / "heldout.md").write_text(heldout_table(rows, name, scheme, config))
    timings["total"] = time.perf_counter() - t_all
    _save(out / "summary.json", summary)
    return summary


def heldout_table(rows, name, scheme: Scheme, config: SearchConfig) -> str:
    head = (
        f"Held-out ({'odd' if config.calib_half == 'even' else 'even'} essays, {config.heldout_windows} windows of "
        f"{config.heldout_seq_len or config.seq_len} tokens), {name}, scheme {scheme.name} "
        f"(page {scheme.page_size}, R {scheme.residual_length}),"
        " decode-faithful.\n\n"
        "| config | avg K/V bits | effective bits | perplexity | KL vs 16-bit (nats) | top-1 agreement |\n"
        "|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['config']} | {r['nominal_bits']:.3f} | {r['effective_bits']:.3f} | {r['perplexity']:.4f} | "
        f"{r['kl']:.5f} | {r['top1']:.4f} |\n"
        for r in sorted(rows, key=lambda r: (-r["nominal_bits"], r["kl"]))
    )
    return head + body
