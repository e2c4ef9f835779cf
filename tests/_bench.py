"""Helper for tests of the scripts in benchmarks/ (scripts, not a package): each loaded as a module by its path."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark(script: str, name: str | None = None):
    """`benchmarks/<script>` as a module, named `name` (default: the script's stem)."""
    path = ROOT / "benchmarks" / script
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
