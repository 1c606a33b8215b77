#!/usr/bin/env bash
# Issue 11 on one 8-GPU host, in two calls of under ten minutes each (PART=1, then PART=2):
#   PART=1  GDN 1.3B dims (2 layers, bf16) at 128K and 256K tokens, forward+backward time and
#           peak memory (benchmarks/bench_cp.py): CP=1 on GPU 0, CP=2 on GPUs 1,2 and CP=4 on
#           GPUs 4-7 side by side, then CP=8 on all eight with its bf16 parity against CP=1 at
#           8K tokens, then TP=2 x CP=4 and TP=4 x CP=2 at 128K (`--tp`, parity against the
#           same TP split without CP)
#   PART=2  the longest trainable sequence at CP=8 (512K to 4M tokens, until out of memory),
#           then H1 1.3B (examples/configs/gdn_h1_1.3b.yaml) trained at 128K tokens with CP=8:
#           50 iterations on the stdlib corpus (byte tokens; tokens/s and the loss curve in
#           OUTDIR/h1-cp8/metrics.jsonl)
# Every job has its own time limit and log (OUTDIR/<job>.log); OUTDIR.tgz holds the logs.
#   WHEELS=path/to/wheels PART=1 bash scripts/gpu_round_eight.sh OUTDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# set-up, job() and pack() from gpu_round.sh (it makes OUTDIR)
source "$ROOT/scripts/gpu_round.sh" --functions-only "$1"
export PYTHONWARNINGS=ignore CUDA_DEVICE_MAX_CONNECTIONS=1
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$NGPU" -lt 8 ]; then
  echo "gpu_round_eight.sh: needs 8 GPUs, found $NGPU" | tee -a "$OUTDIR/summary.txt"
  exit 1
fi
cp_bench() {  # cp_bench NAME SECONDS GPUS NPROC PORT FLAGS...
  local name="$1" secs="$2" gpus="$3" nproc="$4" port="$5"; shift 5
  job "$name" "$secs" "$gpus" python3 -m torch.distributed.run --nproc_per_node "$nproc" \
    --master_port "$port" benchmarks/bench_cp.py --out "$OUTDIR/$name" --layers 2 --impl ours \
    --warmup 1 --iters 3 "$@"
}
case "${PART:-1}" in
  1)
    cp_bench cp1 240 0 1 29701 --seq 131072 262144 --parity-tokens 0 &
    cp_bench cp2 240 1,2 2 29702 --seq 131072 262144 &
    cp_bench cp4 240 4,5,6,7 4 29703 --seq 131072 262144 &
    wait; pack
    cp_bench cp8 120 0,1,2,3,4,5,6,7 8 29704 --seq 131072 262144; pack
    cp_bench tp2-cp4 90 0,1,2,3,4,5,6,7 8 29705 --tp 2 --seq 131072; pack
    cp_bench tp4-cp2 90 0,1,2,3,4,5,6,7 8 29706 --tp 4 --seq 131072
    ;;
  2)
    cp_bench cp8-longest 240 0,1,2,3,4,5,6,7 8 29711 --parity-tokens 0 \
      --seq 524288 1048576 2097152 4194304; pack
    DATA=/tmp/gdn_stdlib_data  # outside OUTDIR: only logs come back
    stdlib_corpus "$DATA" 16 > "$OUTDIR/data.log" 2>&1 \
      || echo "corpus: failed (data.log)" | tee -a "$OUTDIR/summary.txt"
    job h1-cp8 300 0,1,2,3,4,5,6,7 python3 -m torch.distributed.run --nproc_per_node 8 \
      --master_port 29712 examples/pretrain_gdn.py \
      --model-yaml examples/configs/gdn_h1_1.3b.yaml --bf16 --context-parallel-size 8 \
      --data-path "$DATA/stdlib_text_document" --tokenizer-type ByteTokenizer --split 100,0,0 \
      --seq-length 131072 --max-position-embeddings 131072 --micro-batch-size 1 \
      --global-batch-size 1 --train-iters 50 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 5 \
      --clip-grad 1.0 --log-interval 1 --eval-iters 0 --eval-interval 1000000 --no-save \
      --throughput-warmup 5 --out "$OUTDIR/h1-cp8"
    ;;
  *) echo "PART must be 1 or 2" >&2; exit 2 ;;
esac
pack
cat "$OUTDIR/summary.txt"
