#!/usr/bin/env bash
# One call for the recall study of benchmarks/QUALITY.md (issue 9): examples/eval/gpu_study.py
# over every GPU (4 runs per GPU), MQAR with seeds 0-2 by default, within a budget; OUTDIR.tgz
# holds the logs, metrics, evaluations and tables (not the checkpoints).
#   WHEELS=path/to/wheels bash scripts/gpu_round_quality.sh OUTDIR [gpu_study.py arguments]
#   e.g. ... OUTDIR --study niah --seeds 0
# WITH_FLA_CONVERT=1 also runs the fla conversion check (scripts/check_fla_convert_gpu.py,
# issue 8) beside the study on GPU 0, within FLA_S seconds (default 420): one call for both
# where GPUs are scarce. Every training run fits its time (gpu_study.py gives each
# train_recall.py --time-limit-s), so the study's figures do not depend on what runs beside it
# finishing first; only their step counts do (recorded in each eval.json and the tables).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"; shift
mkdir -p "$OUTDIR"
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
export PYTHONWARNINGS=ignore
if [ "${WITH_FLA_CONVERT:-0}" = 1 ]; then
  job fla-convert "${FLA_S:-420}" 0 python3 scripts/check_fla_convert_gpu.py --out "$OUTDIR/fla_convert" &
fi
# the study's tiny models need no kernel autotuning (each of its processes would repeat it)
MEGATRON_GDN_AUTOTUNE=0 job quality "${QUALITY_S:-560}" \
  "$(python3 -c 'import torch; print(",".join(map(str, range(torch.cuda.device_count()))))')" \
  python3 examples/eval/gpu_study.py --out "$OUTDIR/study" --budget-s "${BUDGET_S:-430}" --grace-s 90 "$@"
wait
tar czf "$OUTDIR.tgz" --exclude='*.pt' -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"
cat "$OUTDIR/summary.txt"
