#!/usr/bin/env bash
# The test command of the README: sets up (or reuses) .venv, then runs the whole CPU suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k conv1d -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
# The GPU machines' Triton (3.6.0) beside the environment, not in it: the test suite compiles
# every kernel for Hopper with it too (tests/kernels/test_compile_gpu_triton.py), since Triton
# versions differ in what they accept. Without it (offline) that test variant is skipped.
GPU_TRITON="$(dirname "$(dirname "$PYTHON")")/triton-gpu"
if [ ! -f "$GPU_TRITON/.installed" ]; then
  echo "[env] installing triton 3.6.0 (the GPU machines' version) into $GPU_TRITON"
  rm -rf "$GPU_TRITON"
  if "$PYTHON" -m pip install -q --no-deps --target "$GPU_TRITON" "triton==3.6.0"; then
    touch "$GPU_TRITON/.installed"
  else
    echo "[env] warning: triton 3.6.0 not installed; its compile check will be skipped" >&2
  fi
fi
cd "$ROOT"
exec "$PYTHON" -m pytest tests "$@"
