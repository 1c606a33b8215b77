#!/usr/bin/env bash
# One call for the recall study of benchmarks/QUALITY.md (issue 9): examples/eval/gpu_study.py
# over every GPU (4 runs per GPU), MQAR with seeds 0-2 by default, within a budget; OUTDIR.tgz
# holds the logs, metrics, evaluations and tables (not the checkpoints).
#   WHEELS=path/to/wheels bash scripts/gpu_round_quality.sh OUTDIR [gpu_study.py arguments]
#   e.g. ... OUTDIR --study niah --seeds 0
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"; shift
mkdir -p "$OUTDIR"
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
export PYTHONWARNINGS=ignore
job quality "${QUALITY_S:-560}" "$(python3 -c 'import torch; print(",".join(map(str, range(torch.cuda.device_count()))))')" \
  python3 examples/eval/gpu_study.py --out "$OUTDIR/study" --budget-s "${BUDGET_S:-430}" --grace-s 90 "$@"
tar czf "$OUTDIR.tgz" --exclude='*.pt' -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"
cat "$OUTDIR/summary.txt"
