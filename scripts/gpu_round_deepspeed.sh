#!/usr/bin/env bash
# One call for issue 10 on a 4-GPU machine: the GDN 1.3B preset under DeepSpeed ZeRO-1/2/3 next
# to Megatron's distributed optimizer (examples/launch/gpu_deepspeed_compare.sh), TP=1 on GPUs
# 0,1 beside TP=2 on GPUs 2,3; DeepSpeed from the carried wheels (.whl/deepspeed).
#   WHEELS=path/to/wheels bash scripts/gpu_round_deepspeed.sh OUTDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"
mkdir -p "$OUTDIR"
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
python3 -m pip install -q --no-index --no-deps --no-compile \
  --target "${MEGATRON_GDN_SITE:-/tmp/megatron_gdn_site}" "$WHEELS"/deepspeed/*.whl \
  >> "$OUTDIR/setup.log" 2>&1 || echo "deepspeed wheels: install failed (setup.log)"
export PYTHONWARNINGS=ignore ITERS="${ITERS:-15}"
( job ds-tp1 270 0,1 bash examples/launch/gpu_deepspeed_compare.sh "$OUTDIR/ds" 1 ) &
( job ds-tp2 270 2,3 bash examples/launch/gpu_deepspeed_compare.sh "$OUTDIR/ds" 2 ) &
wait
pack
cat "$OUTDIR/summary.txt"
