#!/usr/bin/env bash
# One call on a 4-GPU machine (~490 s on 4 x H200) for the figures whose reference
# implementations autotune for minutes on their first call:
#   GPU 0: the SSD benchmark next to mamba_ssm (bench_ssd.py; mamba_ssm's Triton kernels
#          autotune for ~2 minutes);
#   GPU 1: the decoding benchmark, GDN against attention with a KV cache (bench_generate.py),
#          then a tiny fla GatedDeltaNet converted and generating (scripts/check_fla_convert_gpu.py);
#   GPU 2: the kernel benchmark at S3 (ours, its stage split, fla);
#   GPU 3: the CP=1 sweep at 128K and 256K (GDN 1.3B dims), then S4 (K 256 / V 512) with the
#          dk launch's key-column block pinned to each candidate (benchmarks/diag_configs.py);
#   then all four: CP=4 next to Megatron's all-to-all CP at 128K, at a head count CP divides
#   (16 heads of 128; fla's first call inside Megatron's layer autotunes for ~150 s).
# On a fresh machine the first CP call compiles and autotunes every kernel (~45 s at these
# dims): run 8's 60 s limit stopped CP=1 before its first length.
#   WHEELS=path/to/wheels bash scripts/gpu_round_followup.sh OUTDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"  # gpu_round.sh creates it
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
export PYTHONWARNINGS=ignore CUDA_DEVICE_MAX_CONNECTIONS=1
job ssd 230 0 python3 benchmarks/bench_ssd.py --out "$OUTDIR/ssd" --heads-per-program 2,8 &
( job generate 150 1 python3 benchmarks/bench_generate.py --out "$OUTDIR/generate"
  job fla-convert 90 1 python3 scripts/check_fla_convert_gpu.py --out "$OUTDIR/fla_convert" ) &
job kernels-s3 200 2 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s3" --shapes S3 --bwd-stages --budget-s 160 &
( job cp1 120 3 torchrun --nproc_per_node 1 --master_port 29514 benchmarks/bench_cp.py \
    --out "$OUTDIR/cp1" --seq 131072 262144 --layers 2 --impl ours --warmup 1 --iters 3 --parity-tokens 0
  # S4 (K 256, V 512: the 1.3B dims): autotuned, then the dk launch pinned to whole K and to
  # key-column blocks of 128 and 64 (and 64 with at most 128 registers: two programs per SM)
  job diag-s4 130 3 python3 benchmarks/diag_configs.py --out "$OUTDIR/diag_s4" --only-grads \
    --grads-shape S4 --grads 64:8:1:256,64:8:1:128,64:8:1:64,64:8:1:64:128 ) &
wait; pack
job cp4-a2a 250 0,1,2,3 torchrun --nproc_per_node 4 --master_port 29515 benchmarks/bench_cp.py \
    --out "$OUTDIR/cp4_a2a" --seq 131072 --layers 2 --heads 16 --value-heads 16 --key-dim 128 \
    --value-dim 128 --impl ours megatron --parity-tokens 0 --warmup 1 --iters 3
pack
echo "=== summary ($(python3 -c 'import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))'))"
cat "$OUTDIR/summary.txt"
