"""The KVTuner search: pruning, clustering, profiling (planted sensitivity), NSGA-II budget, emitted manifests."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from kvtuner_jax import faithful, manifest, model
from kvtuner_jax.search import cluster, optimize, pipeline, prune, space
from kvtuner_jax.search import profile as prof_lib

PLANTED = 2  # layer whose keys are scaled up: 2-bit keys there should be the most damaging


# ---------------------------------------------------------------------------------------------------------------------
# Pure pieces on synthetic data


def test_pareto_mask_hand_case():
    costs = [2, 3, 3, 4, 4, 8]
    losses = [0.9, 0.5, 0.6, 0.5, 0.1, 0.1]
    # (3, 0.6) is beaten by (3, 0.5); (4, 0.5) by (3, 0.5); (8, 0.1) by (4, 0.1).
    assert prune.pareto_mask(costs, losses).tolist() == [True, True, False, False, True, False]
    # Exact duplicates: the first survives, so the result does not depend on anything but the order given.
    assert prune.pareto_mask([1, 1], [0.5, 0.5]).tolist() == [True, False]


def test_prune_layers_matches_brute_force():
    rng = np.random.default_rng(0)
    costs = rng.integers(2, 10, size=12).astype(float)
    losses = rng.random((5, 12))
    keep = prune.prune_layers(losses, costs)
    for l in range(5):
        for a in range(12):
            dominated = any(
                costs[b] <= costs[a]
                and losses[l, b] <= losses[l, a]
                and (costs[b] < costs[a] or losses[l, b] < losses[l, a])
                for b in range(12)
            )
            assert keep[l, a] == (not dominated)
    np.testing.assert_array_equal(keep, prune.prune_layers(losses, costs))


def _three_profiles(seed):
    """12 layers drawn around 3 well-separated log-loss profiles (decades apart)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[-5, -4, -3, -2], [-3, -2, -1, 0], [-4, -1, -4, -1]], float)
    truth = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 1, 0, 2])
    return 10 ** (centers[truth] + 0.1 * rng.normal(size=(12, 4))), truth


def test_kmeans_recovers_planted_groups_deterministically():
    losses, truth = _three_profiles(1)
    groups = cluster.cluster_layers(losses, 3, seed=0)
    want = [sorted(np.flatnonzero(truth == g).tolist()) for g in (0, 1, 2)]  # truth's groups, in first-layer order
    assert groups == want
    for seed in (0, 5):  # same seed -> same answer; labels canonical, so also across seeds on clear data
        assert cluster.cluster_layers(losses, 3, seed=seed) == groups
    labels = cluster.kmeans(cluster.log_features(losses), 4, seed=3)
    np.testing.assert_array_equal(labels, cluster.kmeans(cluster.log_features(losses), 4, seed=3))
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3] and labels[0] == 0
    with pytest.raises(ValueError, match="number of groups"):
        cluster.cluster_layers(losses, 13)


def test_restrict_to_budget_keeps_exactly_the_feasible_configurations():
    import itertools

    pairs = ((2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 16))
    sp = optimize.SearchSpace(6, ((0,), (1, 2), (3, 4, 5)), (pairs, pairs[:4], pairs))
    nominal = lambda p: (p[0] + p[1]) / 2
    small = optimize.restrict_to_budget(sp, nominal, 4.0)
    assert len(small.choices[0]) < len(pairs) and len(small.choices[2]) < len(pairs)  # something was dropped

    def feasible(s):
        out = set()
        for picks in itertools.product(*(range(len(c)) for c in s.choices)):
            lp = s.layer_pairs(picks)
            if space.nominal_bits(lp) <= 4.0:
                out.add(lp)
        return out

    assert feasible(small) == feasible(sp) and feasible(sp)


def test_polish_finds_the_budget_neutral_exchange():
    pairs = [(2, 2), (4, 4), (8, 4)]
    losses = np.array([[0.01, 0.009, 0.0], [1.0, 0.5, 0.1], [0.3, 0.2, 0.15]])  # layer 1 sensitive, layer 0 not
    sp = optimize.SearchSpace(3, ((0,), (1,), (2,)), (tuple(pairs),) * 3)
    sch = space.make_scheme("pertoken", 64)
    budget = lambda lp: space.nominal_bits(lp) - 4.0
    got = optimize.polish(sp, [1, 1, 1], losses, pairs, sch, 64, budget)
    # 2/2 in the insensitive layer pays exactly for 8/4 in the sensitive one; nothing else improves the estimate.
    assert got == [0, 2, 1] and budget(sp.layer_pairs(got)) <= 0


def test_effective_bits_match_manifest_memory_report():
    ident = manifest.ModelIdentity("*", 4, 3, 64)
    pairs = [(8, 4), (2, 16), (4, 2), (16, 16)]
    for name in space.SCHEMES:
        sch = space.make_scheme(name, 64)
        m = pipeline.build_manifest(ident, sch, pairs)
        rep = manifest.memory_report(m, page_size=sch.page_size)
        assert space.effective_bits(pairs, sch, 64) == pytest.approx(rep.effective_bits, rel=1e-12)
        assert space.nominal_bits(pairs) == pytest.approx(rep.avg_nominal_bits)
        assert [s for s in m.layer_specs()] == [sch.layer_spec(*p) for p in pairs]


# ---------------------------------------------------------------------------------------------------------------------
# Profile and search on a tiny random model with a planted sensitive layer


@pytest.fixture(scope="module")
def planted():
    cfg = dataclasses.replace(model.tiny_config(), num_layers=4)
    params = model.init_random_params(cfg, jax.random.key(0))
    layers = list(params.layers)
    # Keys 16x larger: attention logits 16x sharper, so the same relative 2-bit key error moves them 16x more.
    layers[PLANTED] = dataclasses.replace(layers[PLANTED], wk=layers[PLANTED].wk * 16.0)
    params = dataclasses.replace(params, layers=tuple(layers))
    # Two rows of 64 tokens: the same shapes as the pipeline test's windows, so compiled pieces are shared.
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64)).astype(np.int32)
    calib = prof_lib.Calibration.build(params, cfg, tokens)
    sch = space.make_scheme("pertoken", cfg.head_dim, 8)
    prof = prof_lib.profile_layers(calib, sch, batch=3)
    return cfg, params, tokens, calib, sch, prof


def test_evaluate_matches_faithful_logits(planted):
    cfg, params, tokens, calib, sch, _ = planted
    lp = [(4, 2), (16, 16), (2, 8), (8, 4)]
    specs = [sch.layer_spec(*p) for p in lp]
    specs[2] = dataclasses.replace(specs[2], rotation=True)  # rotated keys must be honoured by both paths
    got = calib.evaluate(specs, sch.page_size)
    q = faithful.faithful_logits(params, cfg, tokens, specs, sch.page_size)
    ref = model.logits_dense(params, cfg, tokens)
    # Same float32 computation, layer by layer vs one jitted forward: ~1e-6 relative.
    assert got["kl"] == pytest.approx(float(faithful.kl_vs_reference(q, ref)), rel=1e-3, abs=1e-7)
    assert got["nll"] == pytest.approx(float(np.mean(faithful.token_nll(q, tokens))), rel=1e-5)
    assert got["top1"] == pytest.approx(float(faithful.top1_agreement(q, ref)), abs=1e-6)
    assert got["kl"] > 1e-3


def test_profile_entries_are_single_layer_evaluations(planted):
    cfg, _, _, calib, sch, prof = planted
    assert prof.losses.shape == (cfg.num_layers, len(space.PAIRS))
    dense = [space.make_scheme("pertoken", cfg.head_dim, 8).layer_spec(16, 16)] * cfg.num_layers
    for l, pair in [(0, (2, 2)), (PLANTED, (2, 16)), (3, (8, 4))]:
        specs = list(dense)
        specs[l] = sch.layer_spec(*pair)
        want = calib.evaluate(specs, sch.page_size)["kl"]
        # The suffix loop (stacked weights, batch of 3 candidates) vs the plain layer loop: float32 reorderings only.
        assert prof.losses[l, prof.pairs.index(pair)] == pytest.approx(want, rel=1e-3)
    assert np.all(prof.losses[:, 0] == 0.0)  # 16/16 is the reference itself


def test_profile_reproduces_planted_sensitivity(planted):
    cfg, _, _, _, _, prof = planted
    k2 = prof.losses[:, prof.pairs.index((2, 16))]
    assert int(np.argmax(k2)) == PLANTED
    assert k2[PLANTED] > 2 * np.max(np.delete(k2, PLANTED))  # measured 3.5x: a clear margin, not a coin toss
    # More bits never hurt much: 8-bit keys are far less damaging than 2-bit keys in every layer.
    assert np.all(prof.losses[:, prof.pairs.index((8, 16))] < 0.1 * k2)


@pytest.mark.parametrize("budget_kind,max_bits", [("nominal", 3.0), ("effective", 5.0)])
def test_search_honours_budget_and_protects_planted_layer(planted, budget_kind, max_bits):
    cfg, _, _, calib, sch, prof = planted
    sp, _ = optimize.build_space(prof.losses, prof.pairs, sch, cfg.head_dim, num_groups=cfg.num_layers, seed=0)

    def bits(lp):
        return space.nominal_bits(lp) if budget_kind == "nominal" else space.effective_bits(lp, sch, cfg.head_dim)

    seeds = optimize.greedy_seeds(sp, prof.losses, prof.pairs, sch, cfg.head_dim, lambda lp: bits(lp) - max_bits)
    result = optimize.run_search(
        sp,
        lambda lp: calib.evaluate([sch.layer_spec(*p) for p in lp], sch.page_size)["kl"],
        scheme=sch,
        head_dim=cfg.head_dim,
        max_avg_bits=max_bits,
        budget_kind=budget_kind,
        trials=40,
        population_size=8,
        seed=0,
        seed_points=seeds,
        estimate=lambda lp: optimize.additive_estimate(lp, prof.losses, prof.pairs),
    )
    assert result.front and result.n_trials == 40
    over = [p for p in result.evaluated if bits(p.layer_pairs) > max_bits + 1e-12]
    assert not over  # every returned configuration is within budget
    best = min(result.front, key=lambda p: p.loss)
    k_bits = [k for k, _ in best.layer_pairs]
    others = k_bits[:PLANTED] + k_bits[PLANTED + 1 :]
    assert k_bits[PLANTED] > 2 and k_bits[PLANTED] >= max(others) and k_bits[PLANTED] > min(others), best
    # Front is non-dominated and sorted.
    b = [p.effective_bits for p in result.front]
    l = [p.loss for p in result.front]
    assert b == sorted(b) and all(l[i] > l[i + 1] for i in range(len(l) - 1))


# ---------------------------------------------------------------------------------------------------------------------
# The whole pipeline (CLI library call) on the tiny model


class _CharTokenizer:
    """Stand-in tokenizer: one token per character (the pipeline only calls encode)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text):
        return [ord(c) % self.vocab for c in text]


def test_pipeline_end_to_end_and_resume(planted, tmp_path):
    cfg, params, _, _, _, _ = planted
    rng = np.random.default_rng(4)
    texts = ["".join(chr(97 + int(i)) for i in rng.integers(0, 26, 200)) for _ in range(6)]
    config = pipeline.SearchConfig(
        out_dir=str(tmp_path / "run"),
        model_name="tiny-planted",
        scheme="pertoken",
        page_size=8,
        bits=(16, 2),
        seq_len=64,
        num_windows=2,
        heldout_windows=2,
        num_groups=2,
        trials=12,
        population=4,
        max_avg_bits=4.0,
    )
    logs = []
    summary = pipeline.run(config, params, cfg, _CharTokenizer(cfg.vocab_size), texts, log=logs.append)
    out = tmp_path / "run"
    for f in ("profile.json", "profile.csv", "profile_heatmap.png", "space.json", "pareto.json", "pareto.png",
              "heldout.md", "summary.json", "study.db"):  # fmt: skip
        assert (out / f).exists(), f
    assert summary["front"]
    tokens = (
        np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 40)).astype(np.int32)
    )  # R = 0: Q(t) > 0 from t = 8
    ref = model.logits_dense(params, cfg, tokens)
    for e in summary["front"]:
        m = manifest.load(e["path"], model=manifest.ModelIdentity("tiny-planted", 4, cfg.num_kv_heads, cfg.head_dim))
        assert m.layer_bits() == tuple(tuple(p) for p in e["layer_pairs"])
        assert manifest.memory_report(m, page_size=8).avg_nominal_bits <= 4.0
        meta = m.to_json()["metadata"]
        for key in ("model", "data", "seed", "date", "loss"):
            assert key in meta
        logits = faithful.faithful_logits(params, cfg, tokens, m, 8)  # runs in the decoder
        assert np.all(np.isfinite(np.asarray(logits)))
        kl = float(faithful.kl_vs_reference(logits, ref))
        assert kl > 1e-6 if any(p != [16, 16] for p in e["layer_pairs"]) else abs(kl) < 1e-6
    rows = summary["heldout"]
    assert len(rows) == 4 + len(summary["front"])
    assert next(r for r in rows if r["config"] == "uniform 16/16")["kl"] == pytest.approx(0.0, abs=1e-6)
    # Resume: same storage, more trials -> the study continues (profile reused, old trials kept).
    config2 = dataclasses.replace(config, trials=16, heldout_windows=0)
    again = pipeline.run(config2, params, cfg, _CharTokenizer(cfg.vocab_size), texts, log=logs.append)
    assert any("reused" in s for s in logs)
    assert (summary["n_trials"], again["n_trials"]) == (12, 16)
    n = json.loads((out / "pareto.json").read_text())
    assert len(n["evaluated"]) >= len(summary["front"]) and again["front"]
    assert all(e["nominal_bits"] <= 4.0 for e in again["front"])


def test_shipped_manifests_load_and_honour_their_budget():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs" / "searched"
    files = sorted(root.glob("*/manifests/*.json"))
    if not files:
        pytest.skip("no shipped searched manifests")
    smol = manifest.ModelIdentity("SmolLM2-135M-Instruct", 30, 3, 64)
    for f in files:
        m = manifest.load(f, model=smol)
        meta = m.to_json()["metadata"]
        rep = manifest.memory_report(m, page_size=meta["page_size"])
        assert rep.avg_nominal_bits <= meta["max_avg_bits"] + 1e-9, f
        assert rep.avg_nominal_bits == pytest.approx(meta["nominal_bits"]) and rep.effective_bits == pytest.approx(
            meta["effective_bits"]
        )
        for key in ("model", "data", "seed", "date", "loss"):
            assert key in meta, (f, key)
        front = json.loads((f.parent.parent / "pareto.json").read_text())["front"]
        entry = next(e for e in front if Path(e["path"]).name == f.name)
        assert [list(p) for p in m.layer_bits()] == entry["layer_pairs"]


@pytest.mark.slow
def test_shipped_manifests_run_on_smollm2():
    from pathlib import Path

    from kvtuner_jax import assets, weights

    root = Path(__file__).resolve().parent.parent / "configs" / "searched"
    dirs = sorted(d for d in root.glob("*") if (d / "manifests").is_dir())
    if not dirs:
        pytest.skip("no shipped searched manifests")
    try:
        cfg, params, tok = weights.load_model(None, progress=False)
    except Exception as e:  # assets missing on this machine
        pytest.skip(f"SmolLM2 not available: {e}")
    tokens = np.asarray([tok.encode(assets.essay_texts()[1])[:96]], np.int32)
    calib = prof_lib.Calibration.build(params, cfg, tokens)
    for d in dirs:
        f = max(
            (d / "manifests").glob("*.json"), key=lambda p: manifest.memory_report(manifest.load(p)).avg_nominal_bits
        )
        m = manifest.load(f)
        r = calib.evaluate(m.layer_specs(), m.to_json()["metadata"]["page_size"])
        # The highest-bit manifest on each front is a near-lossless 4-bit-ish config: small but nonzero KL.
        assert 0.0 < r["kl"] < 0.05 and r["top1"] > 0.8, (f, r)
