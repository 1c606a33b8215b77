#!/usr/bin/env bash
# A CUDA 13.0 compiler for scripts/build_fa3.sh from PyPI's NVIDIA wheels, for machines without
# a CUDA toolkit (no GPU needed; ~270 MB):
#
#   bash scripts/fa3_toolchain.sh [DIR]          # DIR defaults to .fa3-cuda (git ignores it)
#   CUDA_HOME=$(bash scripts/fa3_toolchain.sh) FA_SRC=... bash scripts/build_fa3.sh
#
# Prints the CUDA_HOME to use (and nothing else on stdout). 13.0 matches the CUDA of torch's
# cu130 wheels (the extension must be built for the CUDA major version of the torch it loads in).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.fa3-cuda}"
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
      nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88)
SUB=nvidia/cu13
if [ ! -x "$DIR/$SUB/bin/nvcc" ]; then
  python3 -m pip install -q --no-deps --target "$DIR" "${PKGS[@]}" >&2
fi
"$DIR/$SUB/bin/nvcc" --version | tail -2 >&2
echo "$DIR/$SUB"
