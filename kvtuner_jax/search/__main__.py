"""python -m kvtuner_jax.search: KVTuner's offline search (profile, prune, cluster, NSGA-II) for one model.

Example (SmolLM2-135M, KIVI layout, reduced calibration size for a 2-core CPU):
    python -m kvtuner_jax.search --out_dir runs/smollm2-kivi --scheme kivi --seq_len 256 --num_windows 2 --trials 60
"""

from __future__ import annotations

from absl import app, flags

from kvtuner_jax.search.pipeline import SearchConfig, run

F = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Where profile, plots, study, manifests and summary go.", required=True)
flags.DEFINE_string("model", None, "Model (.gguf, HF dir or Orbax dir); default the embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("model_name", None, "Model name written into manifests (default: SmolLM2-135M-Instruct / config).")
flags.DEFINE_enum("scheme", "kivi", ["kivi", "pertoken"], "Quantization layout of every candidate.")
flags.DEFINE_integer("page_size", 0, "Cache page size P (0: 32 for kivi, 16 for pertoken).")
flags.DEFINE_list("bits", ["16", "8", "4", "2"], "Candidate bit widths for K and for V (pairs are all combinations).")
flags.DEFINE_integer("seq_len", 512, "Tokens per calibration window.")
flags.DEFINE_integer("num_windows", 8, "Calibration windows (from the calibration half of the essays).")
flags.DEFINE_integer("heldout_windows", 8, "Held-out windows (other half) for the final table; 0 skips it.")
flags.DEFINE_integer("heldout_seq_len", 0, "Tokens per held-out window (0: --seq_len).")
flags.DEFINE_integer("heldout_front", 0, "Front manifests in the held-out table (evenly spaced, top kept); 0: all.")
flags.DEFINE_enum("calib_half", "even", ["even", "odd"], "Essays (by sorted file index) used for calibration.")
flags.DEFINE_integer("num_groups", 6, "Layer groups (k-means on log-KL profiles); one pair is chosen per group.")
flags.DEFINE_integer("trials", 100, "Total NSGA-II trials in the study (a resumed study runs only the rest).")
flags.DEFINE_integer("population", 24, "NSGA-II population size.")
flags.DEFINE_integer("seed", 0, "Seed of clustering and NSGA-II.")
flags.DEFINE_float("max_avg_bits", 4.0, "Hard budget on the average K/V bits of every returned manifest.")
flags.DEFINE_enum("budget_kind", "nominal", ["nominal", "effective"], "Budget on nominal bits or incl. scales.")
flags.DEFINE_string("storage", None, "Optuna storage (sqlite:///path.db) for resuming; default <out_dir>/study.db.")
flags.DEFINE_string("study_name", None, "Optuna study name (default: model and scheme).")
flags.DEFINE_integer("profile_batch", 1, "Candidates run together through the suffix while profiling.")
flags.DEFINE_bool("reuse_profile", True, "Reuse <out_dir>/profile.json when its settings match.")


def main(argv):
    del argv
    config = SearchConfig(
        out_dir=F.out_dir,
        model=F.model,
        model_name=F.model_name,
        scheme=F.scheme,
        page_size=F.page_size,
        bits=tuple(int(b) for b in F.bits),
        seq_len=F.seq_len,
        num_windows=F.num_windows,
        heldout_windows=F.heldout_windows,
        heldout_seq_len=F.heldout_seq_len,
        heldout_front=F.heldout_front,
        calib_half=F.calib_half,
        num_groups=F.num_groups,
        trials=F.trials,
        population=F.population,
        seed=F.seed,
        max_avg_bits=F.max_avg_bits,
        budget_kind=F.budget_kind,
        storage=F.storage,
        study_name=F.study_name,
        profile_batch=F.profile_batch,
        reuse_profile=F.reuse_profile,
    )
    summary = run(config, log=lambda s: print(s, flush=True))
    print(f"timings (s): {summary['timings_s']}")
    for e in summary["front"]:
        print(f"{e['nominal_bits']:.3f} bits, {e['effective_bits']:.3f} effective, KL {e['loss']:.5g}: {e['path']}")


if __name__ == "__main__":
    app.run(main)
