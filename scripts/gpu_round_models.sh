#!/usr/bin/env bash
# One call on a 2-GPU machine for the model-level figures (issues 5-8), two one-GPU lanes side
# by side, then one two-GPU job:
#   GPU 0: training throughput of the GDN 1.3B, H1 1.3B and Qwen3-Next-style presets at 4K,
#          27 iterations of 8 x 4096 tokens each (examples/launch/gpu_throughput.sh);
#   GPU 1: the hybrid models and the SWA core (bench_hybrid.py);
#   GPUs 0,1 after both lanes (GPUs 2,3 beside them on a 4-GPU machine, followed there by the
#          CP=4 length sweep with its parity check):
#          the H2 1.3B preset trained 50 iterations under CP=2 on the stdlib text corpus
#          (the README's CPU data, built here), loss in OUTDIR/train_h2_cp2/metrics.jsonl (not
#          TP=2: the preset's Mamba2 layers have one B/C group, which TP cannot split).
# SSD next to mamba_ssm, decoding and CP=4 next to Megatron's all-to-all CP moved to
# gpu_round_followup.sh: mamba_ssm's and fla's first calls autotune for ~2-3 minutes, more than
# this call had left for them (run 8). ~420 s on 4 x H200.
#   WHEELS=path/to/wheels bash scripts/gpu_round_models.sh OUTDIR
# Every job has its own time limit and log (OUTDIR/*.log); a failing job does not stop others.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"
mkdir -p "$OUTDIR"
# set-up, job() and pack() from gpu_round.sh
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
export PYTHONWARNINGS=ignore CUDA_DEVICE_MAX_CONNECTIONS=1

( job train-1gpu 270 0 env ITERS=27 MBS=4 GBS=8 bash examples/launch/gpu_throughput.sh "$OUTDIR/train" ) &
job hybrid 150 1 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/hybrid" &
# the corpus for the two-GPU job, built on the CPU while the lanes run
DATA=/tmp/gdn_stdlib_data  # outside OUTDIR: only logs come back
stdlib_corpus "$DATA" 8 > "$OUTDIR/data.log" 2>&1 &
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
h2() {  # h2 GPUS: the hybrid H2 1.3B at CP = 2 on the stdlib corpus
job train-h2-cp2 "${H2_S:-170}" "$1" python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
  examples/pretrain_gdn.py --model-yaml examples/configs/gdn_h2_1.3b.yaml --bf16 \
  --context-parallel-size 2 \
  --data-path "$DATA/stdlib_text_document" --tokenizer-type ByteTokenizer --split 100,0,0 \
  --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 4 --global-batch-size 8 \
  --train-iters 50 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 5 --clip-grad 1.0 \
  --log-interval 1 --eval-iters 0 --eval-interval 1000000 --no-save --throughput-warmup 5 \
  --out "$OUTDIR/train_h2_cp2"
}
if [ "$NGPU" -ge 4 ]; then
  # GPUs 2 and 3 are free: as soon as the corpus is built, beside the one-GPU lanes
  ( for _ in $(seq 120); do [ -f "$DATA/stdlib_text_document.idx" ] && break; sleep 2; done
    h2 2,3 ) &
  wait; pack
  # then on all four GPUs (gpu_round.sh has the CP=1 sweep): CP=4 with the bf16 parity check,
  # lengths up to the first OOM; a profile of one step at 128K (gpu_round.sh profiles CP=1 at
  # 32K, the same tokens per rank: the difference is what context parallelism adds)
  job cp4 150 0,1,2,3 torchrun --nproc_per_node 4 --master_port 29512 benchmarks/bench_cp.py \
      --out "$OUTDIR/cp4" --seq 131072 262144 524288 1048576 2097152 --layers 2 --impl ours \
      --parity-tokens 8192 --warmup 1 --iters 3 --profile-seq 131072
else
  wait
  h2 0,1
fi
pack
echo "=== summary ($(python3 -c 'import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))'))"
cat "$OUTDIR/summary.txt"
