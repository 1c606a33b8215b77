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
export PYTHONPATH="$SITE:$ROOT:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import torch, triton, megatron_gdn.kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')")
