#!/usr/bin/env bash
# The test command of the README: sets up (or reuses) .venv, then runs the whole CPU suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k conv1d -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$PYTHON" -m pytest tests "$@"
