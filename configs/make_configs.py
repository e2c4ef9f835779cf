"""Regenerates the manifests in configs/: `python configs/make_configs.py` (or `--check` to verify, exit 1 on drift).

SmolLM2-135M-Instruct uniform and KIVI-style presets, and KVTuner's upstream Llama-3.1-8B / Qwen2.5-7B presets
(read from ../shared/reference/kvtuner_presets, CRLF line endings and all) converted to our JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from kvtuner_jax import assets
from kvtuner_jax import manifest as mf
from kvtuner_jax.specs import ModelIdentity

HERE = Path(__file__).resolve().parent
UPSTREAM = assets.kvtuner_presets_dir()
SMOLLM2 = ModelIdentity("SmolLM2-135M-Instruct", num_layers=30, num_kv_heads=3, head_dim=64)
GENERATED_BY = "configs/make_configs.py"
KIVI = dict(k_axis="channel", k_group_size=32, v_axis="token", v_group_size=32, residual_length=32)


def build() -> dict[str, mf.Manifest]:
    """File name -> manifest, for every generated file in configs/."""
    out = {}
    for k, v in ((16, 16), (8, 8), (8, 4), (4, 4), (4, 2), (2, 2)):
        meta = {
            "preset": f"uniform: K {k} bits, V {v} bits, per-token groups of head_dim",
            "generated_by": GENERATED_BY,
        }
        out[f"smollm2_k{k}v{v}.json"] = mf.uniform(SMOLLM2, k, v, metadata=meta)
    for b in (2, 4):
        meta = {
            "preset": f"KIVI-style {b}-bit: keys per-channel (groups of 32 tokens), values per-token (groups of 32 "
            "channels), asymmetric, most recent 32 tokens in full precision",
            "generated_by": GENERATED_BY,
        }
        out[f"kivi_k{b}v{b}.json"] = mf.uniform(SMOLLM2, b, b, metadata=meta, **KIVI)
    for name, src in (
        ("llama31_8b_kvtuner_3.25bit.json", "Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml"),
        ("qwen25_7b_kvtuner_4.0bit.json", "Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml"),
    ):
        m = mf.from_kvtuner_yaml(UPSTREAM / src)
        meta = {**m.to_json()["metadata"], "generated_by": GENERATED_BY}
        out[name] = dataclasses.replace(m, metadata=meta, source=None)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write into (default: configs/)")
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = parser.parse_args(argv)
    drift = []
    for name, m in build().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != m.dumps():
                drift.append(name)
        else:
            m.save(path)
    if drift:
        print("out of date: " + ", ".join(drift), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
