#!/usr/bin/env bash
# Prepare an offline GPU machine that already has torch + triton (no network): install wheels
# from a local folder (megatron-core, fla-core for the side-by-side benchmarks) and this
# package itself, without touching torch. Source it:  WHEELS=path/to/wheels source scripts/gpu_setup.sh
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE="${MEGATRON_GDN_SITE:-/tmp/megatron_gdn_site}"
mkdir -p "$SITE"
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
fi
# the package: kernels/ must import as megatron_gdn.kernels
rm -rf "$SITE/megatron_gdn"
mkdir -p "$SITE/megatron_gdn"
for entry in "$ROOT"/megatron_gdn/*; do ln -sfn "$entry" "$SITE/megatron_gdn/$(basename "$entry")"; done
ln -sfn "$ROOT/kernels" "$SITE/megatron_gdn/kernels"
export PYTHONPATH="$SITE:$ROOT/tests:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, megatron_gdn.kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
