"""python -m kvtuner_jax.eval: perplexity, KL, greedy agreement and passkey of KV manifests vs the 16-bit model.

    python -m kvtuner_jax.eval --manifest configs/ --out runs/eval.jsonl --plot runs/eval.png
    python -m kvtuner_jax.eval --manifest configs/smollm2_k8v8.json --manifest configs/kivi_k2v2.json \
        --tasks perplexity,kl --seq_len 1024 --num_windows 2
    python -m kvtuner_jax.eval --kv_nbits_key 4 --kv_nbits_value 2      # one uniform manifest from flags

--manifest is repeatable; a directory means every *.json in it that fits the model. A 16-bit row is added unless
one is present. Inputs: the held-out half of the embedded essays, or --texts (.txt, .jsonl, directories).
Results: JSONL (one line per manifest), a rich table (also written as Markdown beside the JSONL), a PNG plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from kvtuner_jax import manifest as mf
from kvtuner_jax.errors import KVTunerError, ManifestError
from kvtuner_jax.eval import (
    TASKS,
    EvalConfig,
    build_data,
    count_passes,
    entry_of,
    evaluate,
    load_texts,
    summary_table,
    write_jsonl,
)
from kvtuner_jax.eval import plot as plot_results
from kvtuner_jax.inference import define_kv_flags, kv_flags_from, main_guard, model_identity, resolve_manifest

F = flags.FLAGS
flags.DEFINE_string("model", None, "Model (.gguf, HF dir or Orbax dir); default the embedded SmolLM2-135M-Instruct.")
flags.DEFINE_multi_string("manifest", [], "Manifest file or directory (repeatable); 'none' = 16-bit.")
flags.DEFINE_list("tasks", list(TASKS), f"Tasks, some of {', '.join(TASKS)}.")
flags.DEFINE_multi_string("texts", [], "Text inputs: .txt / .jsonl files or directories (default: embedded essays).")
flags.DEFINE_enum("split", "heldout", ["heldout", "calib", "all"], "Which essays when --texts is not given.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per perplexity/KL window.")
flags.DEFINE_integer("num_windows", 8, "Perplexity/KL windows.")
flags.DEFINE_integer("batch_size", 2, "Rows per forward pass.")
flags.DEFINE_integer("page_size", 32, "KV page size P of the cache being modelled.")
flags.DEFINE_integer("agreement_prompts", 4, "Prompts for greedy agreement.")
flags.DEFINE_integer("agreement_prompt_len", 128, "Tokens per agreement prompt.")
flags.DEFINE_integer("agreement_new_tokens", 32, "Greedy tokens per agreement prompt.")
flags.DEFINE_list("passkey_lengths", ["1024", "2048", "4096", "8192"], "Passkey prompt lengths (tokens).")
flags.DEFINE_list("passkey_depths", ["0.1", "0.5", "0.9"], "Needle depths (fraction of the filler).")
flags.DEFINE_integer("passkey_trials", 1, "Samples per (length, depth).")
flags.DEFINE_integer("seed", 0, "Seed for window choice and passkeys.")
flags.DEFINE_enum("path", "faithful", ["faithful", "engine"], "faithful: one pass; engine: decode steps (slow).")
flags.DEFINE_enum("backend", "auto", ["auto", "reference", "gpu", "tpu"], "Kernels of --path=engine.")
flags.DEFINE_string("dtype", "float32", "Params/activations dtype.")
flags.DEFINE_string("out", "eval_results.jsonl", "JSONL output (a .md table and, unless --plot='', a .png beside).")
flags.DEFINE_string("plot", None, "PNG plot path (default: --out with .png; '' = none).")
flags.DEFINE_bool("include_16bit", True, "Add a 16-bit row when no manifest is all 16-bit.")
define_kv_flags()


def collect_manifests(specs: list[str], kv, model_cfg, model_path, log=print) -> list:
    """[(name, Manifest)] from --manifest values (files, directories, 'none') or the --kv_* flags."""
    if specs and kv is not None:
        raise KVTunerError("--manifest cannot be combined with the --kv_* flags (they build a uniform manifest)")
    if not specs:
        m, src = resolve_manifest(None, kv, model_cfg, model_path)
        log(f"manifest: {src}")
        return [("kv_flags" if kv is not None else Path(m.source or "manifest").stem, m)]
    out = []
    for s in specs:
        p = Path(s)
        if s.lower() == "none":
            out.append(("16-bit", resolve_manifest("none", None, model_cfg)[0]))
        elif p.is_dir():
            found = 0
            for f in sorted(p.glob("*.json")):
                try:
                    m = resolve_manifest(str(f), None, model_cfg)[0]
                except ManifestError as e:
                    log(f"skipping {f}: {e}")
                    continue
                out.append((f.stem, m))
                found += 1
            if not found:
                raise KVTunerError(f"--manifest directory {p} holds no manifest for {model_cfg.name}")
        else:
            out.append((p.stem, resolve_manifest(s, None, model_cfg)[0]))
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise KVTunerError(f"manifest names must be unique; {sorted(dup)[0]!r} appears twice")
    return out


def run() -> None:
    from tqdm.auto import tqdm

    from kvtuner_jax.weights import load_model

    ecfg = EvalConfig(
        tasks=tuple(F.tasks),
        seq_len=F.seq_len,
        num_windows=F.num_windows,
        batch_size=F.batch_size,
        page_size=F.page_size,
        agreement_prompts=F.agreement_prompts,
        agreement_prompt_len=F.agreement_prompt_len,
        agreement_new_tokens=F.agreement_new_tokens,
        passkey_lengths=tuple(int(x) for x in F.passkey_lengths),
        passkey_depths=tuple(float(x) for x in F.passkey_depths),
        passkey_trials=F.passkey_trials,
        seed=F.seed,
        path=F.path,
        backend=F.backend,
    )
    kv = kv_flags_from(F)
    if F.manifest and kv is not None:
        raise KVTunerError("--manifest cannot be combined with the --kv_* flags (they build a uniform manifest)")
    model_cfg, params, tok = load_model(F.model, dtype=F.dtype)
    if tok is None:
        raise KVTunerError(f"model {F.model} has no tokenizer")
    named = collect_manifests(list(F.manifest), kv, model_cfg, F.model)
    if F.include_16bit and not any(all(b == (16, 16) for b in m.layer_bits()) for _, m in named):
        named.insert(0, ("16-bit", mf.uniform(model_identity(model_cfg), 16, 16)))
    entries = [entry_of(n, m) for n, m in named]
    texts = load_texts(F.texts, F.split)
    print(f"model {model_cfg.name}; {len(entries)} manifests: {', '.join(e.name for e in entries)}")
    data = build_data(tok, texts, params, model_cfg, ecfg)
    bar = tqdm(total=count_passes(data, ecfg, len(entries)), desc="eval", unit="pass")
    results = evaluate(params, model_cfg, entries, data, ecfg, progress=bar.update)
    bar.close()
    out = Path(F.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(results, out)
    md = summary_table(results)
    out.with_suffix(".md").write_text(md + "\n")
    plot_path = out.with_suffix(".png") if F.plot is None else (Path(F.plot) if F.plot else None)
    if plot_path is not None:
        plot_results(results, plot_path, title=f"{model_cfg.name}: quality vs effective bits")
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {plot_path}" if plot_path else ""))


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        main_guard(run)
    except ValueError as e:  # flag values that do not parse (e.g. --passkey_lengths=abc)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
