#!/usr/bin/env bash
# Prepare an offline GPU machine that already has torch + triton (no network): install wheels
# from a local folder (megatron-core, fla-core for the side-by-side benchmarks) and put this
# checkout on PYTHONPATH (megatron_gdn maps kernels/ to megatron_gdn.kernels itself), without
# touching torch.
#   WHEELS=path/to/wheels source scripts/gpu_setup.sh      (default: ./.whl when present)
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE="${MEGATRON_GDN_SITE:-/tmp/megatron_gdn_site}"
# the wheel folder defaults to the checkout's .whl (git-ignored) when it exists
if [ -z "${WHEELS:-}" ] && [ -d "$ROOT/.whl" ]; then WHEELS="$ROOT/.whl"; fi
mkdir -p "$SITE"
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
fi
# a newer ptxas for diagnostics (benchmarks/diag_configs.py --ptxas): .ptxas/ptxas-*.gz
# (git-ignored, carried; from NVIDIA's nvidia-cuda-nvcc wheel), not used by anything else
NEW_PTXAS_GZ="$(ls "$ROOT"/.ptxas/ptxas-*.gz 2>/dev/null | tail -1)"
if [ -n "$NEW_PTXAS_GZ" ]; then
  mkdir -p /tmp/megatron_gdn_ptxas
  gunzip -c "$NEW_PTXAS_GZ" > /tmp/megatron_gdn_ptxas/ptxas && chmod +x /tmp/megatron_gdn_ptxas/ptxas
  export MEGATRON_GDN_NEW_PTXAS=/tmp/megatron_gdn_ptxas/ptxas
fi
export PYTHONPATH="$SITE:$ROOT:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import torch, triton, megatron_gdn.kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')")
