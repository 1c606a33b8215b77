#!/usr/bin/env bash
# CPU-scale needle study (benchmarks/QUALITY.md, "CPU-scale needles"): S-NIAH-2 (one needle in
# random distractor words, a 4-digit value) and MK-NIAH-1 (four needles, the query asks for one),
# vocab 64, trained at T = 64, evaluated at 64 / 128 / 256 / 512 (1x-8x), the models of
# run_cpu_study.sh on the same budget (2000 steps x batch 32, AdamW, cosine), one thread each.
#
#     bash examples/eval/run_cpu_needles.sh                         # seed 0, lr 1e-3
#     SEEDS="0 1" TASKS="s_niah_2" LR=3e-3 bash examples/eval/run_cpu_needles.sh
#
# Writes ROOT/TASK/MODEL/sSEED (default ROOT runs/cpu_niah); a run whose eval.json exists is
# skipped; then ROOT/TASK/summary.json (examples/eval/summarize_recall.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-runs/cpu_niah}
SEEDS=${SEEDS:-0}
TASKS=${TASKS:-"s_niah_2 mk_niah_1"}
MODELS=${MODELS:-"gdn deltanet mamba2 attention gdn_h1 gdn_h2"}
LR=${LR:-1e-3}
THREADS=${THREADS:-1}
LENGTHS="64 128 256 512"

for seed in $SEEDS; do
  for task in $TASKS; do
    for cfg in $MODELS; do
      out="$ROOT/$task/$cfg/s$seed"
      [ -f "$out/eval.json" ] && continue
      mkdir -p "$out"
      nice -n 10 "$PY" examples/eval/train_recall.py --config examples/eval/configs/cpu/$cfg.yaml \
        --task "$task" --seq-length 64 --steps 2000 --batch-size 32 --lr "$LR" --seed "$seed" \
        --log-interval 50 --eval-lengths $LENGTHS --eval-samples 256 --num-threads "$THREADS" \
        --out "$out" > "$out.log" 2>&1 || { echo "FAILED: $out (see $out.log)"; exit 1; }
      echo "done $out"
    done
  done
done

for task in $TASKS; do
  "$PY" examples/eval/summarize_recall.py "$ROOT/$task" --models $MODELS --out "$ROOT/$task/summary.json"
done
