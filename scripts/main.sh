#!/usr/bin/env bash
# The main job of the README: sets up (or reuses) .venv, then runs the CPU demo.
# Extra arguments go to the demo script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$PYTHON" examples/kernel_demo.py "$@"
