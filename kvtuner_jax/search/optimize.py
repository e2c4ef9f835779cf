"""Steps 2-4 of the search: the grouped search space, and NSGA-II over it (Optuna).

Space: layers are clustered into groups (cluster.py); each group picks one (K bits, V bits) pair for all its layers,
among the Pareto set (prune.py) of the group's summed profile losses against the pair's effective bits. Objectives:
(effective bits per K/V element incl. scales, measured loss of the whole configuration), both minimised. The budget
(max average bits, nominal or effective) is a hard constraint: a configuration over it is never evaluated (it gets the
profile's additive loss estimate and a positive constraint violation, so NSGA-II ranks it below every feasible one)
and never returned.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Sequence

import numpy as np
import optuna

from kvtuner_jax.search import cluster, prune
from kvtuner_jax.search.space import Scheme, effective_bits, nominal_bits

Pair = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """groups[g]: layer indices of group g; choices[g]: the pairs group g may take (Pareto set, cheapest first)."""

    num_layers: int
    groups: tuple[tuple[int, ...], ...]
    choices: tuple[tuple[Pair, ...], ...]

    def layer_pairs(self, picks: Sequence[int]) -> tuple[Pair, ...]:
        """Choice indices per group -> (K bits, V bits) per layer."""
        out: list[Pair | None] = [None] * self.num_layers
        for g, layers in enumerate(self.groups):
            for l in layers:
                out[l] = self.choices[g][picks[g]]
        return tuple(out)  # type: ignore[arg-type]

    def to_lists(self) -> tuple[list, list]:
        return list(self.groups), list(self.choices)

    def to_json(self) -> dict:
        return {
            "groups": [list(g) for g in self.groups],
            "choices": [[list(p) for p in c] for c in self.choices],
        }


def build_space(
    losses: np.ndarray,
    pairs: Sequence[Pair],
    scheme: Scheme,
    head_dim: int,
    num_groups: int,
    seed: int = 0,
) -> tuple[SearchSpace, np.ndarray]:
    """Cluster layers (k-means on log losses) and prune each group's pairs. Returns (space, per-layer keep mask)."""
    losses = np.asarray(losses, np.float64)
    costs = [scheme.pair_bits(k, v, head_dim) for k, v in pairs]
    keep = prune.prune_layers(losses, costs)
    groups = cluster.cluster_layers(losses, num_groups, seed)
    choices = []
    for layers in groups:
        mask = prune.pareto_mask(costs, losses[layers].sum(0))
        idx = sorted(np.flatnonzero(mask), key=lambda c: (costs[c], losses[layers, c].sum()))
        choices.append(tuple(tuple(pairs[c]) for c in idx))
    return SearchSpace(losses.shape[0], tuple(tuple(g) for g in groups), tuple(choices)), keep


def restrict_to_budget(space: SearchSpace, pair_bits: Callable[[Pair], float], max_avg_bits: float) -> SearchSpace:
    """Drops choices that cannot be within budget whatever the other groups pick (even at their cheapest): they would
    only waste NSGA-II trials. `pair_bits` must be the per-layer quantity the budget averages over layers. Every
    feasible configuration of `space` stays in the result."""
    sizes = [len(g) for g in space.groups]
    cheapest = [min(pair_bits(p) for p in c) * n for c, n in zip(space.choices, sizes, strict=True)]
    total_min = sum(cheapest)
    choices = []
    for c, n, lo in zip(space.choices, sizes, cheapest, strict=True):
        room = max_avg_bits * space.num_layers - (total_min - lo)
        kept = tuple(p for p in c if pair_bits(p) * n <= room + 1e-9)
        choices.append(kept or c[:1])  # an infeasible budget still leaves the cheapest choice to evaluate
    return dataclasses.replace(space, choices=tuple(choices))


def additive_estimate(layer_pairs: Sequence[Pair], losses: np.ndarray, pairs: Sequence[Pair]) -> float:
    """Sum over layers of the single-layer profile losses: a cheap (first-order) estimate of a configuration's loss."""
    index = {tuple(p): c for c, p in enumerate(pairs)}
    return float(sum(losses[l, index[tuple(p)]] for l, p in enumerate(layer_pairs)))


def greedy_seeds(space: SearchSpace, losses, pairs, scheme: Scheme, head_dim: int, budget: Callable) -> list[list[int]]:
    """Starting points: the additive-estimate greedy path from all-cheapest upwards (buying, at each step, the upgrade
    with the best loss reduction per bit), keeping the points within budget; each of those polished by exchanges at
    its own bit level (`polish`); plus uniform choices where available."""
    n_g = len(space.groups)
    seeds: list[list[int]] = []
    picks = [0] * n_g
    while True:
        lp = space.layer_pairs(picks)
        if budget(lp) <= 0:
            seeds.append(list(picks))
        base_loss, base_bits = additive_estimate(lp, losses, pairs), effective_bits(lp, scheme, head_dim)
        best, best_gain = None, 0.0
        for g in range(n_g):
            for c in range(picks[g] + 1, len(space.choices[g])):
                trial = list(picks)
                trial[g] = c
                tp = space.layer_pairs(trial)
                d_bits = effective_bits(tp, scheme, head_dim) - base_bits
                gain = (base_loss - additive_estimate(tp, losses, pairs)) / max(d_bits, 1e-9)
                if gain > best_gain:
                    best, best_gain = trial, gain
        if best is None:
            break
        picks = best
    for s in list(seeds):  # each greedy point, improved by exchanges at no more bits than it has
        level = budget(space.layer_pairs(s))
        seeds.append(polish(space, s, losses, pairs, scheme, head_dim, lambda lp, level=level: budget(lp) - level))
    for pair in sorted({p for c in space.choices for p in c}):
        if all(pair in c for c in space.choices):
            seeds.append([c.index(pair) for c in space.choices])
    out, seen = [], set()
    for s in seeds:
        if tuple(s) not in seen:
            seen.add(tuple(s))
            out.append(s)
    return out


def polish(space: SearchSpace, picks, losses, pairs, scheme: Scheme, head_dim: int, budget: Callable) -> list[int]:
    """Hill-climbs the additive estimate by exchanges within budget: one group down a step (or more) and another up,
    best exchange first, until none improves. Reaches mixes the upward greedy path cannot (it never downgrades), e.g.
    paying for 8-bit keys in a sensitive layer with 2-bit values in an insensitive one."""
    index = {tuple(p): c for c, p in enumerate(pairs)}
    losses = np.asarray(losses)
    g_loss = [[float(losses[list(ls), index[p]].sum()) for p in ch] for ls, ch in zip(*space.to_lists(), strict=True)]
    picks = list(picks)
    while True:
        best, best_delta = None, -1e-12
        for gd in range(len(picks)):
            for cd in range(picks[gd]):
                for gu in range(len(picks)):
                    if gu == gd:
                        continue
                    for cu in range(picks[gu] + 1, len(space.choices[gu])):
                        delta = g_loss[gd][cd] - g_loss[gd][picks[gd]] + g_loss[gu][cu] - g_loss[gu][picks[gu]]
                        if delta < best_delta:
                            trial = list(picks)
                            trial[gd], trial[gu] = cd, cu
                            if budget(space.layer_pairs(trial)) <= 0:
                                best, best_delta = trial, delta
        if best is None:
            return picks
        picks = best


@dataclasses.dataclass
class FrontPoint:
    trial: int
    layer_pairs: tuple[Pair, ...]
    nominal_bits: float
    effective_bits: float
    loss: float

    def to_json(self) -> dict:
        return {
            "trial": self.trial,
            "layer_pairs": [list(p) for p in self.layer_pairs],
            "nominal_bits": self.nominal_bits,
            "effective_bits": self.effective_bits,
            "loss": self.loss,
        }


@dataclasses.dataclass
class SearchResult:
    front: list[FrontPoint]  # feasible, evaluated, non-dominated; sorted by bits
    evaluated: list[FrontPoint]  # every feasible evaluated trial
    seconds: float
    n_trials: int


def run_search(
    space: SearchSpace,
    evaluate: Callable[[tuple[Pair, ...]], float],
    *,
    scheme: Scheme,
    head_dim: int,
    max_avg_bits: float,
    budget_kind: str = "nominal",
    trials: int = 100,
    seed: int = 0,
    storage: str | None = None,
    study_name: str = "kvtuner",
    seed_points: Sequence[Sequence[int]] = (),
    estimate: Callable[[tuple[Pair, ...]], float] | None = None,
    population_size: int = 24,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """NSGA-II over group choices until the study holds `trials` trials (resumes from `storage`).

    evaluate(layer_pairs) -> measured loss of the whole configuration (called only for configurations within budget).
    estimate(layer_pairs) -> cheap loss stand-in for configurations over budget (default: 1e9).
    """
    if budget_kind not in ("nominal", "effective"):
        raise ValueError(f"budget_kind {budget_kind!r} is not 'nominal' or 'effective'")

    def bits_of(lp):
        return nominal_bits(lp) if budget_kind == "nominal" else effective_bits(lp, scheme, head_dim)

    def violation(lp) -> float:
        return bits_of(lp) - max_avg_bits

    t0 = time.perf_counter()
    sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        sampler=sampler,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        for s in seed_points:
            study.enqueue_trial({f"g{g}": int(c) for g, c in enumerate(s)}, skip_if_exists=True)
    cache: dict[tuple[Pair, ...], float] = {}
    for t in done:
        if t.user_attrs.get("evaluated"):
            cache[tuple(tuple(p) for p in t.user_attrs["layer_pairs"])] = t.values[1]

    def objective(trial: optuna.Trial):
        picks = [trial.suggest_categorical(f"g{g}", list(range(len(c)))) for g, c in enumerate(space.choices)]
        lp = space.layer_pairs(picks)
        v = violation(lp)
        trial.set_constraint("budget", v)  # NSGA-II ranks feasible (<= 0) trials first
        trial.set_user_attr("layer_pairs", [list(p) for p in lp])
        feasible = v <= 0
        if feasible:
            if lp not in cache:
                cache[lp] = float(evaluate(lp))
            loss = cache[lp]
        else:
            loss = float(estimate(lp)) if estimate is not None else 1e9
        trial.set_user_attr("evaluated", feasible)
        if log:
            state = f"loss {loss:.5g}" if feasible else f"over budget ({bits_of(lp):.3f} bits), not evaluated"
            log(f"trial {trial.number}: {nominal_bits(lp):.3f} nominal bits, {state}")
        return effective_bits(lp, scheme, head_dim), loss

    remaining = trials - len(done)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining)
    evaluated = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE or not t.user_attrs.get("evaluated"):
            continue
        lp = tuple(tuple(p) for p in t.user_attrs["layer_pairs"])
        if violation(lp) > 0:  # budget changed between resumed runs: never return an over-budget manifest
            continue
        evaluated.append(FrontPoint(t.number, lp, nominal_bits(lp), effective_bits(lp, scheme, head_dim), t.values[1]))
    return SearchResult(pareto_front(evaluated), evaluated, time.perf_counter() - t0, len(study.trials))


def pareto_front(points: Sequence[FrontPoint]) -> list[FrontPoint]:
    """Non-dominated points on (effective bits, loss), one per configuration, sorted by bits then loss."""
    uniq: dict[tuple[Pair, ...], FrontPoint] = {}
    for p in points:
        uniq.setdefault(p.layer_pairs, p)
    pts = list(uniq.values())
    mask = prune.pareto_mask([p.effective_bits for p in pts], [p.loss for p in pts])
    return sorted((p for p, m in zip(pts, mask, strict=True) if m), key=lambda p: (p.effective_bits, p.loss))


def provenance(**kw) -> dict:
    """Metadata block for emitted manifests: given fields plus the UTC date."""
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **kw}


def dumps(obj) -> str:
    return json.dumps(obj, indent=1)
