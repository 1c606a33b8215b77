#!/usr/bin/env bash
# On a GPU machine: make the FlashAttention-3 build in .fa3 (scripts/build_fa3.sh, made on
# another machine and carried here) load, or build it again here from the sources it packed
# (.fa3/src.tar.xz, PACK_SRC=1) with this machine's nvcc, g++ and torch. Then print where FA3
# comes from and whether its check (swa_fa3.py) passes on this GPU for bf16 / head dim 128.
#   bash scripts/gpu_fa3_ready.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
loads() { python3 -c "import sys; sys.path.insert(0, '.fa3'); import flash_attn_interface" 2>&1; }
if why="$(loads)"; then
  echo "gpu_fa3_ready: the carried build loads"
else
  echo "gpu_fa3_ready: the carried build does not load (${why##*$'\n'}); building it here"
  [ -f .fa3/src.tar.xz ] || { echo "gpu_fa3_ready: no .fa3/src.tar.xz to build from" >&2; exit 1; }
  src="$(mktemp -d)"
  tar -xJf .fa3/src.tar.xz -C "$src"
  FA_SRC="$src" CUTLASS="$src/cutlass" JOBS="${JOBS:-4}" bash scripts/build_fa3.sh .fa3 || exit 1
  why="$(loads)" || { echo "gpu_fa3_ready: the build made here does not load either: $why" >&2; exit 1; }
fi
python3 - <<'PY'
import torch
from megatron_gdn.hybrid.swa_fa3 import fa3_status, fa3_supported
q = torch.zeros(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
ok = fa3_supported(q)
print(f"gpu_fa3_ready: check on {torch.cuda.get_device_name()} (bf16, head dim 128): "
      f"{'passed' if ok else 'FAILED'}; {fa3_status()}")
raise SystemExit(0 if ok else 1)
PY
