#!/usr/bin/env bash
# One call on a 2- or 4-GPU machine for issue 6's multi-GPU runs: GDN 1.3B trained on the
# stdlib text corpus (built here, examples/data/build_corpus.py, byte tokens) with
#   dp2     data parallel on 2 GPUs, Megatron's distributed optimizer, 4K context
#   tp2     tensor parallel 2 with sequence parallelism, 4K context
#   cp2     context parallel 2 at 32K context
#   cp4     context parallel 4 at 32K context (4 GPUs only)
# 50 iterations each; loss (first -> last), tokens/s and MFU land in OUTDIR/<job>/summary.json
# and metrics.jsonl. With 4 GPUs dp2 and tp2 run side by side (GPUs 0,1 and 2,3), then cp2
# beside nothing, then cp4 on all four. ~300 s on 2 GPUs.
#   WHEELS=path/to/wheels bash scripts/gpu_round_scaleout.sh OUTDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# set-up, job(), pack() and stdlib_corpus() from gpu_round.sh (it makes OUTDIR)
source "$ROOT/scripts/gpu_round.sh" --functions-only "$1"
export PYTHONWARNINGS=ignore CUDA_DEVICE_MAX_CONNECTIONS=1
DATA=/tmp/gdn_stdlib_data  # outside OUTDIR: only logs come back
stdlib_corpus "$DATA" 16 > "$OUTDIR/data.log" 2>&1 \
  || echo "corpus: failed (data.log)" | tee -a "$OUTDIR/summary.txt"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
train() {  # train NAME SECONDS GPUS NPROC PORT SEQ MBS GBS FLAGS...: 50 iterations of GDN 1.3B
  local name="$1" secs="$2" gpus="$3" nproc="$4" port="$5" seq="$6" mbs="$7" gbs="$8"; shift 8
  job "$name" "$secs" "$gpus" python3 -m torch.distributed.run --nproc_per_node "$nproc" \
    --master_port "$port" examples/pretrain_gdn.py \
    --model-yaml examples/configs/gdn_1.3b.yaml --bf16 \
    --data-path "$DATA/stdlib_text_document" --tokenizer-type ByteTokenizer --split 100,0,0 \
    --seq-length "$seq" --max-position-embeddings "$seq" --micro-batch-size "$mbs" \
    --global-batch-size "$gbs" --train-iters 50 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 5 \
    --clip-grad 1.0 --log-interval 1 --eval-iters 0 --eval-interval 1000000 --no-save \
    --throughput-warmup 5 --gdn-keep-chunk-states --out "$OUTDIR/$name" "$@"
}
if [ "$NGPU" -ge 4 ]; then
  train dp2 150 0,1 2 29601 4096 4 16 --use-distributed-optimizer &
  train tp2 150 2,3 2 29602 4096 4 8 --tensor-model-parallel-size 2 --sequence-parallel &
  wait; pack
  train cp2 150 0,1 2 29603 32768 1 2 --context-parallel-size 2; pack
  train cp4 150 0,1,2,3 4 29604 32768 1 2 --context-parallel-size 4
elif [ "$NGPU" -ge 2 ]; then
  train dp2 150 0,1 2 29601 4096 4 16 --use-distributed-optimizer; pack
  train tp2 150 0,1 2 29602 4096 4 8 --tensor-model-parallel-size 2 --sequence-parallel; pack
  train cp2 150 0,1 2 29603 32768 1 2 --context-parallel-size 2
else
  echo "scale-out: needs 2 or 4 GPUs, found $NGPU" | tee -a "$OUTDIR/summary.txt"
fi
pack
for s in "$OUTDIR"/*/summary.json; do [ -f "$s" ] && echo "$s" && cat "$s"; done
cat "$OUTDIR/summary.txt"
