#!/usr/bin/env bash
# One call on one GPU (H100 or H200), jobs one after another within TOTAL_S seconds (default
# 570; each job's limit is cut to what is left):
# (SKIP_ATTN=1 skips the attention jobs, SKIP_KTESTS=1 the kernel tests.)
#   0. the kernel tests of the chunked rule and the SSD kernel (small shapes, on the GPU);
#   1. a tiny fla GatedDeltaNet converted and generating (scripts/check_fla_convert_gpu.py;
#      fla's kernels autotune on their first calls, alone on the GPU here; SKIP_FLA=1 skips it);
#   2. the attention cores: cuDNN's band attention against the torch oracle (GPU tests), then
#      the SWA core at window 2048 / 16K tokens, every backend against causal SDPA with each
#      of its kernels (benchmarks/bench_hybrid.py --no-models);
#   3. the GDN 1.3B and H1 1.3B models (4 x 4096 tokens, forward+backward) timed and profiled
#      kernel by kernel, by kind (benchmarks/bench_hybrid.py --profile): what limits their
#      tokens/s (Megatron's GPU fusions on; then GDN 1.3B once more with them off, timed only);
#      then GDN 1.3B training throughput (examples/launch/gpu_throughput.sh, 26
#      iterations of 64K tokens with the optimizer, Megatron's mock data), once more with the chunk states
#      kept from the forward and Megatron's fused cross entropy (--gdn-keep-chunk-states
#      --cross-entropy-loss-fusion; the kept states also timed without the optimizer);
#   4. the kernel benchmark at S4 (the 1.3B dims: K 256 / V 512), ours stage by stage;
#   4b. the reverse state pass (dh) at S4 pinned to each of DH_PINS in turn
#      (scripts/gpu_dh_sweep.sh: every gradient's error against the fp32 torch path and the
#      fwd+bwd time per pin; SKIP_DH_S4=1 skips it);
#   5. the SSD kernel next to mamba_ssm (SKIP_SSD=1 skips it)'s (a mamba_ssm wheel among the carried ones; it
#      autotunes for ~2 minutes), the Mamba2 1.3B shape at 4 x 4096;
#   6. the kernel benchmark at S3, ours and fla's, stage by stage, in what time is left
#      (SKIP_S3=1 skips it).
#   WHEELS=path/to/wheels bash scripts/gpu_round_single.sh OUTDIR
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"
START=$(date +%s)
TOTAL_S="${TOTAL_S:-570}"
source "$ROOT/scripts/gpu_round.sh" --functions-only "$OUTDIR"
export PYTHONWARNINGS=ignore
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
timed() {  # timed NAME SECONDS COMMAND...: job with its limit cut to the time left
  local name="$1" secs="$2"; shift 2
  local rest; rest=$(left)
  [ "$rest" -lt "$secs" ] && secs="$rest"
  if [ "$secs" -lt 30 ]; then echo "$name: skipped, ${rest}s left" | tee -a "$OUTDIR/summary.txt"; return; fi
  job "$name" "$secs" 0 "$@"
  pack
}
# the kernels changed since the last GPU run, at small shapes in bf16 / fp32 (the kept states,
# the flattened grids)
[ "${SKIP_KTESTS:-0}" = 1 ] || timed kernel-tests 120 $TESTS_CMD tests/kernels/test_chunk_entry.py \
  tests/kernels/test_chunk_bwd.py tests/kernels/test_ssd.py
[ "${SKIP_FLA:-0}" = 1 ] || timed fla-convert 280 python3 scripts/check_fla_convert_gpu.py --out "$OUTDIR/fla_convert"
[ "${SKIP_ATTN:-0}" = 1 ] || timed attn-tests 60 python3 -m pytest -q -p no:cacheprovider -rs tests/hybrid/test_attention.py -k "cudnn or swa"
[ "${SKIP_ATTN:-0}" = 1 ] || timed attn-bench 90 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/attention" --no-models
# issue 6's figure: 20+ iterations after the 5 of warm-up, 64K tokens each (4 micro-batches:
# the optimizer step's share as in a real run, not one step per 16K tokens)
timed train 150 env ITERS=26 MBS=4 GBS=16 bash examples/launch/gpu_throughput.sh "$OUTDIR/train" gdn_1.3b
# the same with every speed option on: the chunk states kept, Megatron's fused cross entropy
timed train-best 140 env ITERS=26 MBS=4 GBS=16 EXTRA="--gdn-keep-chunk-states --cross-entropy-loss-fusion" \
  bash examples/launch/gpu_throughput.sh "$OUTDIR/train_best" gdn_1.3b
timed model-profile 120 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/model_profile" \
  --models gdn_1.3b,gdn_h1_1.3b --seqs 4x4096 --no-attn --iters 5 --warmup 2 --profile 2
timed check-s4-keep 90 python3 benchmarks/bench_kernels.py --out "$OUTDIR/check_s4_keep" --shapes S4 --no-fla \
  --check --check-dtypes bf16 --keep-states --budget-s 70
timed model-keep 60 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/model_keep" \
  --models gdn_1.3b --seqs 4x4096 --no-attn --iters 4 --warmup 1 --keep-states
timed model-nofusions 60 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/model_nofusions" \
  --models gdn_1.3b --seqs 4x4096 --no-attn --iters 4 --warmup 1 --no-fusions
timed kernels-s4 90 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s4" --shapes S4 --no-fla \
  --bwd-stages --budget-s 70
[ "${SKIP_DH_S4:-0}" = 1 ] || timed dh-s4 150 bash scripts/gpu_dh_sweep.sh S4 "${DH_PINS:-auto 16:4:2:0 32:4:2:0 32:4:1:0 64:8:1:1}"
[ "${SKIP_SSD:-0}" = 1 ] || timed ssd 170 python3 benchmarks/bench_ssd.py --out "$OUTDIR/ssd" --shapes 4x4096 --mamba-chunks 128 \
  --heads-per-program 8 --stages
[ "${SKIP_S3:-0}" = 1 ] || timed kernels-s3 200 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s3" --shapes S3 \
  --bwd-stages --budget-s "$(( $(left) - 25 ))"
pack
cat "$OUTDIR/summary.txt"
