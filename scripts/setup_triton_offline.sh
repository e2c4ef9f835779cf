#!/usr/bin/env bash
# Optional: builds .venv-triton (Python 3.11 + standalone Triton 3.8, whose wheels here are cp311 only) for
# benchmarks/triton_sass.py, which compiles our kernel's Triton IR to SASS on a machine without a GPU.
# Idempotent; not needed to run, test or serve anything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -x .venv-triton/bin/python ] && .venv-triton/bin/python -c 'import triton' 2>/dev/null; then
    exit 0
fi
py=""
for cand in "${KVTUNER_TRITON_PYTHON:-}" python3.11 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        py="$(command -v "$cand")"; break
    fi
done
if [ -z "$py" ]; then
    echo "setup_triton_offline: no Python 3.11 found (the local Triton wheels are cp311); point KVTUNER_TRITON_PYTHON" >&2
    echo "setup_triton_offline: at one, or install a Triton wheel that matches another Python and edit this script." >&2
    exit 1
fi
"$py" -m venv .venv-triton
if ! .venv-triton/bin/python -m pip install -q triton==3.8.0; then
    echo "setup_triton_offline: 'pip install triton==3.8.0' failed: no matching wheel in the configured index" >&2
    exit 1
fi
echo "setup_triton_offline: ready (.venv-triton, $(.venv-triton/bin/python -c 'import triton; print(triton.__version__)'))"
