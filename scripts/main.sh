#!/usr/bin/env bash
# The main job of the README: sets up (or reuses) .venv, then pretrains a tiny Gated DeltaNet
# language model on CPU with megatron.training.pretrain: 2 gloo processes (tensor parallel 2),
# bytes of the Python standard library as the corpus, a checkpoint at the end.
#
#   bash scripts/main.sh                         # 300 iterations, runs/cpu_demo
#   bash scripts/main.sh --train-iters 30        # shorter; any pretrain_gdn.py / Megatron flag
#   bash scripts/main.sh --out runs/other        # another run directory
#
# Extra arguments go to examples/pretrain_gdn.py (later flags override the cpu-tiny preset).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"

OUT="runs/cpu_demo"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out) OUT="${args[$((i + 1))]}" ;;
    --out=*) OUT="${args[$i]#--out=}" ;;
  esac
done
NPROC="${MEGATRON_GDN_NPROC:-2}"

"$PYTHON" examples/data/build_corpus.py --out "$OUT/data" --max-mb "${MEGATRON_GDN_CORPUS_MB:-4}"
if [ ! -f "$OUT/data/stdlib_text_document.idx" ]; then
  "$PYTHON" examples/data/preprocess.py --input "$OUT/data/stdlib.jsonl" \
    --output-prefix "$OUT/data/stdlib" --tokenizer-type ByteTokenizer
fi
# one intra-op thread per process: the 2 processes share the machine's cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Megatron warns about deprecated paths and missing fused kernels at every start-up
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  examples/pretrain_gdn.py --preset cpu-tiny --out "$OUT" "$@"
