#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv, Python >= 3.12) and install the
# package with its dev extras. Sourced by scripts/main.sh and scripts/test.sh; safe to re-run:
# it reinstalls only when setup.py changed. pip keeps no cache: torch's wheels are several GB and a
# cached copy beside the installed one doubled what a first install needs on disk.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_GDN_VENV:-$ROOT/.venv}"

find_python() {
  for cand in python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  # pyenv installations (as on the project's CPU machines): the oldest supported first
  if command -v pyenv >/dev/null 2>&1; then
    for ver in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -V); do
      if PYENV_VERSION="$ver" pyenv which python3 >/dev/null 2>&1; then
        PYENV_VERSION="$ver" pyenv which python3; return 0
      fi
    done
  fi
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)" || { echo "megatron-gdn needs Python >= 3.12 (megatron-core 0.19 requires it); none found" >&2; exit 1; }
  echo "[env] creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.megatron-gdn-installed"
WANT="$(cat "$ROOT/setup.py" | sha1sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[env] installing megatron-gdn and its dependencies into $VENV (first run: a few minutes)"
  "$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q --no-cache-dir -e "$ROOT[dev]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHON="$VENV/bin/python"
