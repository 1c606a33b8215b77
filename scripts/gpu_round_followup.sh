#!/usr/bin/env bash
# A short call on a 4-GPU machine (~300 s on 4 x H200) for the figures a full round leaves to
# the end or times out on:
#   GPU 0: the SSD benchmark next to mamba_ssm (its Triton kernels autotune for ~2 minutes);
#   GPU 1: the decoding benchmark, GDN against attention with a KV cache;
#   GPU 2: the kernel benchmark at S3 (ours, its stage split, fla);
#   GPU 3: the CP=1 sweep at 128K and 256K, then the kernel benchmark at S2;
#   then all four: CP=4 at 128K and 256K with the bf16 parity check against CP=1.
#   WHEELS=path/to/wheels bash scripts/gpu_round_followup.sh OUTDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"
mkdir -p "$OUTDIR"
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
export PYTHONWARNINGS=ignore CUDA_DEVICE_MAX_CONNECTIONS=1
CP_ARGS="--layers 2 --impl ours --warmup 1 --iters 3"
job ssd 230 0 python3 benchmarks/bench_ssd.py --out "$OUTDIR/ssd" &
job generate 150 1 python3 benchmarks/bench_generate.py --out "$OUTDIR/generate" &
job kernels-s3 200 2 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s3" --shapes S3 --bwd-stages --budget-s 160 &
( job cp1 60 3 torchrun --nproc_per_node 1 --master_port 29514 benchmarks/bench_cp.py \
    --out "$OUTDIR/cp1" --seq 131072 262144 $CP_ARGS --parity-tokens 0
  job kernels-s2 170 3 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s2" --shapes S2 --bwd-stages --budget-s 130 ) &
wait; pack
job cp4 70 0,1,2,3 torchrun --nproc_per_node 4 --master_port 29512 benchmarks/bench_cp.py \
    --out "$OUTDIR/cp4" --seq 131072 262144 $CP_ARGS --parity-tokens 8192
pack
echo "=== summary ($(python3 -c 'import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))'))"
cat "$OUTDIR/summary.txt"
