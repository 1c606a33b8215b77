#!/usr/bin/env bash
# A short call on a 2-GPU machine, for what a longer round left unmeasured:
#   GPU 0: the kernel benchmark at S3 (ours, its stage split, fla) then the layer benchmark
#          (ours only: Megatron's first call alone takes ~140 s);
#   GPU 1: GDN 1.3B training throughput at 4K, Megatron-LM's pretrain_gpt.py with our spec,
#          then the GPU tests of the float32 K = 256 cases and the half-precision sums.
#   WHEELS=path/to/wheels bash scripts/gpu_round_short.sh OUTDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"
mkdir -p "$OUTDIR"
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
( job kernels-s3 170 0 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels" --shapes S3 --bwd-stages --budget-s 150
  job layer 60 0 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer" --shapes qwen3next --impls ours --no-check --iters 10 --warmup 3 ) &
( job train-1gpu 100 1 env ITERS=27 MBS=4 GBS=8 bash examples/launch/gpu_throughput.sh "$OUTDIR/train" gdn_1.3b
  pretrain_gpt 1 75
  job tests 50 1 $TESTS_CMD tests/kernels/test_gated_delta_rule.py -k "K256 or A_log or g_zero" ) &
wait
pack
cat "$OUTDIR/summary.txt"
