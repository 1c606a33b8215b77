#!/usr/bin/env bash
# One call on one GPU (H100 or H200), jobs one after another within TOTAL_S seconds (default
# 570; each job's limit is cut to what is left, a job under 30 s is skipped), in this order:
#   kernel-tests   the tests of what changed since the last GPU run (SKIP_KTESTS=1)
#   dh-s4          the reverse state pass at S4 pinned to each of DH_PINS (scripts/gpu_dh_sweep.sh:
#                  errors against the fp32 torch path, fwd+bwd per pin; SKIP_DH_S4=1)
#   dh-s3          the same at S3, the wide launch's two-stage pins among them (SKIP_DH_S3=1)
#   train-dh-pin   issue 6 at 256K tokens per step with dh-s4's winner pinned (none: skipped)
#   fla-convert    a tiny fla GatedDeltaNet converted and generating (SKIP_FLA=1)
#   fa3-ready      FlashAttention-3 from .fa3 (carried: scripts/build_fa3.sh with PACK_SRC=1),
#                  built again here if it does not load, and its check (scripts/gpu_fa3_ready.sh)
#   attn-tests, attn-bench   cuDNN's band attention and FA3 against the torch oracle; the SWA
#                  core at window 2048 / 16K tokens against causal SDPA and FA3 causal
#                  (these three: SKIP_ATTN=1)
#   train          GDN 1.3B training throughput (examples/launch/gpu_throughput.sh: 26
#                  iterations of 64K tokens with the optimizer, Megatron's mock data)
#   train-best     the same with the chunk states kept and Megatron's fused cross entropy
#   train-best-gbs64  the same with 64 sequences (256K tokens) per step
#   train-h1, train-qwen  H1 1.3B (256K tokens per step) and the Qwen3-Next-style demo (64K)
#                  with the same flags
#   train-timers   GDN 1.3B at 64K tokens per step with Megatron's level-2 timers (the
#                  optimizer step's parts)
#   norm-gemm      the gated norm's backward configs, in_proj's weight-gradient matmuls
#   model-profile  GDN 1.3B and H1 1.3B forward+backward at 4 x 4096, profiled kernel by kernel
#   check-s4-keep  the kernels at S4 in bf16 against the fp32 torch path, states kept, and timed
#   model-keep, model-nofusions   GDN 1.3B forward+backward with the states kept; with
#                  Megatron's fusions off
#   kernels-s4     the kernel benchmark at S4 (K 256 / V 512), the backward stage by stage; the
#                  output kernel's register-capped candidates (OUTPUT_PINS) checked and timed; the
#                  autotuned kernels (the capped prep / output candidates among them) checked in bf16
#   grads-s3, grads-s4   the gradient stage's two launches pinned to each of GRAD_PINS
#                  (scripts/gpu_grads_sweep.sh; SKIP_GRADS=1)
#   ssd            the SSD kernel next to mamba_ssm at 4 x 4096 and 1 x 16384, launch by launch, with one
#                  value head per program of its backward (the default: eight) and with the
#                  backward's state passes in line, with x * dt formed in torch (not in the
#                  kernels), with the chunk backward at one pipelining stage, both kernels
#                  profiled kernel by kernel (SKIP_SSD=1; mamba_ssm autotunes ~2 minutes;
#                  SSD_ARGS replaces those rows, SSD_SHAPES the shapes)
#   ssd-tests      the SSD kernel's and the Mamba2 mixer's GPU tests (only with ONLY)
#   kernels-s3     S3, ours and fla's, stage by stage, checked in bf16 (SKIP_S3=1)
#   layer, layer-keep   the GDN layer next to Megatron's own; ours with the states kept (SKIP_LAYER=1)
#                  (the layer job's limit LAYER_S, default 330: on a fresh machine Megatron's
#                  first call alone took 183 s, 2026-12-07)
#   layer-ours     ours alone, as it is (only with ONLY)
#   layer-profile  ours kernel by kernel at 1 x 16384 and 4 x 4096 (profile_layer.py; only with ONLY)
#   kernels-s2s1   S2 and S1 next to fla, for issue 2's three shapes (with kernels-s3; SKIP_S2S1=1)
#   kernel-suite   the whole GPU test suite of the kernels, the single-GPU layer and the
#                  attention cores (pytest-xdist; only with ONLY)
#   kernels-all    S3, S2 and S1 next to fla in one run (issue 2's figure; only with ONLY),
#                  ours also with KALL_AB's backward change off
# Every kernel benchmark times ours twice: as it is and with the states kept (`ours_keep`).
# ONLY="job ..." runs just the named jobs, SKIP_JOBS="job ..." all but those (later calls pick
# up where one ended).
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
  # ONLY="a b": run just these jobs; SKIP_JOBS="a b": all but these (calls after the first)
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [[ " ${SKIP_JOBS:-} " == *" $name "* ]]; then return; fi
  local rest; rest=$(left)
  [ "$rest" -lt "$secs" ] && secs="$rest"
  if [ "$secs" -lt 30 ]; then echo "$name: skipped, ${rest}s left" | tee -a "$OUTDIR/summary.txt"; return; fi
  job "$name" "$secs" 0 "$@"
  pack
}
# what changed since the last GPU run, at small shapes in bf16 / fp32 (the gated norm's
# backward configs, in_proj's padded weight gradient)
[ "${SKIP_KTESTS:-0}" = 1 ] || timed kernel-tests 120 $TESTS_CMD tests/kernels/test_gated_norm.py \
  tests/layer/test_aligned_proj.py tests/kernels/test_tuning.py
# the reverse state pass at S4 pinned to each of DH_PINS (BV:warps:stages:ROW_SCALE[:maxnreg];
# pins skip the shared-memory estimate, which had cut 64:8:2:1 to one stage: ptxas puts it at
# 188.7 KB; BV 32 / 4 warps with the key decay on k is the forward state pass's S4 launch),
# then issue 6 at 256K tokens per step with the winner pinned (MEGATRON_GDN_PIN, picked by
# scripts/pick_dh_pin.py: >2% faster, as exact; the job is skipped when none wins)
[ "${SKIP_DH_S4:-0}" = 1 ] || timed dh-s4 150 bash scripts/gpu_dh_sweep.sh S4 \
  "${DH_PINS:-auto 64:8:2:1 32:4:3:0 32:4:2:0}"
# the same pipelined pins at S3 (K = V = 128; the wide launch at two stages 106.7 KB) against the
# autotuned one-stage pass (0.62 ms of S3's 4.80 ms with the states kept)
[ "${SKIP_DH_S3:-0}" = 1 ] || timed dh-s3 120 bash scripts/gpu_dh_sweep.sh S3 \
  "${DH_PINS_S3:-auto 64:8:2:1 64:8:2:0 32:4:2:0 32:4:3:0}"
DH_WIN=$(python3 "$ROOT/scripts/pick_dh_pin.py" "$OUTDIR/dh-s4.log")
echo "dh pin: ${DH_WIN:-none}" | tee -a "$OUTDIR/summary.txt"
[ -z "$DH_WIN" ] || timed train-dh-pin 200 env MEGATRON_GDN_PIN="$DH_WIN" ITERS=25 MBS=4 GBS=64 \
  EXTRA="--gdn-keep-chunk-states --cross-entropy-loss-fusion" \
  bash examples/launch/gpu_throughput.sh "$OUTDIR/train_dh_pin" gdn_1.3b
[ "${SKIP_FLA:-0}" = 1 ] || timed fla-convert 280 python3 scripts/check_fla_convert_gpu.py --out "$OUTDIR/fla_convert"
[ "${SKIP_ATTN:-0}" = 1 ] || timed fa3-ready 300 bash scripts/gpu_fa3_ready.sh
[ "${SKIP_ATTN:-0}" = 1 ] || timed attn-tests 90 python3 -m pytest -q -p no:cacheprovider -rs tests/hybrid/test_attention.py -k "cudnn or swa or fa3"
[ "${SKIP_ATTN:-0}" = 1 ] || timed attn-bench 150 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/attention" --no-models
# issue 6's figure: 20+ iterations after the 5 of warm-up, 64K tokens each (4 micro-batches:
# the optimizer step's share as in a real run, not one step per 16K tokens)
timed train 150 env ITERS=26 MBS=4 GBS=16 bash examples/launch/gpu_throughput.sh "$OUTDIR/train" gdn_1.3b
# the same with every speed option on: the chunk states kept, Megatron's fused cross entropy
timed train-best 140 env ITERS=26 MBS=4 GBS=16 EXTRA="--gdn-keep-chunk-states --cross-entropy-loss-fusion" \
  bash examples/launch/gpu_throughput.sh "$OUTDIR/train_best" gdn_1.3b
# the same at 256K tokens per step (16 micro-batches of 16K: the optimizer step's share at a
# pretraining batch nearer a real one's, ~0.5M tokens)
timed train-best-gbs64 280 env ITERS=25 MBS=4 GBS=64 EXTRA="--gdn-keep-chunk-states --cross-entropy-loss-fusion" \
  bash examples/launch/gpu_throughput.sh "$OUTDIR/train_best_gbs64" gdn_1.3b
# where the ~63 ms a step outside the micro-batches goes (the fit of the 64K- and 256K-token
# runs): Megatron's level-2 timers (forward-backward, the optimizer's copy / clip / inner step /
# copy back) printed every iteration, at 64K tokens per step
timed train-timers 140 env ITERS=15 MBS=4 GBS=16 EXTRA="--gdn-keep-chunk-states --cross-entropy-loss-fusion --timing-log-level 2" \
  bash examples/launch/gpu_throughput.sh "$OUTDIR/train_timers" gdn_1.3b
# issue 6's other two presets with the same flags: H1 at 256K tokens per step; the
# Qwen3-Next-style demo (2.2B, 64 experts: ~4x slower a token) at 64K
timed train-h1 260 env ITERS=25 MBS=4 GBS=64 EXTRA="--gdn-keep-chunk-states --cross-entropy-loss-fusion" \
  bash examples/launch/gpu_throughput.sh "$OUTDIR/train_h1" gdn_h1_1.3b
timed train-qwen 180 env ITERS=25 MBS=4 GBS=16 EXTRA="--gdn-keep-chunk-states --cross-entropy-loss-fusion" \
  bash examples/launch/gpu_throughput.sh "$OUTDIR/train_qwen" qwen3_next_style
# the gated norm's backward launch configs and in_proj's / fc1's weight-gradient matmuls
timed norm-gemm 90 python3 benchmarks/bench_norm_gemm.py --out "$OUTDIR/norm_gemm"
timed model-profile 120 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/model_profile" \
  --models gdn_1.3b,gdn_h1_1.3b --seqs 4x4096 --no-attn --iters 5 --warmup 2 --profile 2
timed check-s4-keep 90 python3 benchmarks/bench_kernels.py --out "$OUTDIR/check_s4_keep" --shapes S4 --no-fla \
  --check --check-dtypes bf16 --keep-states --budget-s 70
timed model-keep 60 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/model_keep" \
  --models gdn_1.3b --seqs 4x4096 --no-attn --iters 4 --warmup 1 --keep-states
timed model-nofusions 60 python3 benchmarks/bench_hybrid.py --out "$OUTDIR/model_nofusions" \
  --models gdn_1.3b --seqs 4x4096 --no-attn --iters 4 --warmup 1 --no-fusions
timed kernels-s4 110 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s4" --shapes S4 --no-fla \
  --bwd-stages --diag --output-pins "${OUTPUT_PINS:-64:4:2:192}" --check --check-dtypes bf16 --no-check-packed \
  --budget-s 90
# the gradient stage at 16 warps (offline, sm_90a: 115-128 registers, 16 warps per SM where 8
# run now at 172-255) against the autotuned configs, exactness and time per pin
[ "${SKIP_GRADS:-0}" = 1 ] || timed grads-s3 150 bash scripts/gpu_grads_sweep.sh S3 \
  "${GRAD_PINS:-auto 64:16:1:64 64:16:1:128 64:16:2:64}"
[ "${SKIP_GRADS:-0}" = 1 ] || timed grads-s4 150 bash scripts/gpu_grads_sweep.sh S4 \
  "${GRAD_PINS:-auto 64:16:1:64 64:16:1:128 64:16:2:64}"
# the SSD kernel's and the Mamba2 mixer's GPU tests (bf16 and fp32; only with ONLY)
# shellcheck disable=SC2086
[ -z "${ONLY:-}" ] || timed ssd-tests 120 $TESTS_CMD tests/kernels/test_ssd.py tests/mamba2/test_mixer.py
# (a short call times ours and mamba_ssm alone with SSD_ARGS=" ")
# shellcheck disable=SC2086
[ "${SKIP_SSD:-0}" = 1 ] || timed ssd 220 python3 benchmarks/bench_ssd.py --out "$OUTDIR/ssd" \
  --shapes "${SSD_SHAPES:-4x4096,1x16384}" --mamba-chunks 128 \
  ${SSD_ARGS:---heads-per-program 1 --ab-overlap --ab-fused-dt --ab-bwd-stages --stages --trace}
[ "${SKIP_S3:-0}" = 1 ] || timed kernels-s3 200 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s3" --shapes S3 \
  --bwd-stages --diag --output-pins "${OUTPUT_PINS:-64:4:2:192}" --check --check-dtypes bf16 \
  --budget-s "$(( $(left) - 25 ))"
# issue 3: the layer next to Megatron's GDN (fla's kernels inside, autotuned on its first call)
[ "${SKIP_LAYER:-0}" = 1 ] || timed layer "${LAYER_S:-330}" python3 benchmarks/bench_layer.py --out "$OUTDIR/layer" \
  --shapes qwen3next --iters 10 --warmup 3
# ours alone (its first call and timing, no Megatron: that one autotunes fla for ~2.5 minutes)
[ -z "${ONLY:-}" ] || timed layer-ours 120 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer_ours" \
  --shapes qwen3next --impls ours --no-check --iters 10 --warmup 3
# the layer kernel by kernel at both lengths (torch profiler; only with ONLY)
[ -z "${ONLY:-}" ] || timed layer-profile 120 bash -c "python3 benchmarks/profile_layer.py --out '$OUTDIR/layer_profile' \
  --seq 1x16384 && python3 benchmarks/profile_layer.py --out '$OUTDIR/layer_profile' --seq 4x4096"
[ "${SKIP_LAYER:-0}" = 1 ] || timed layer-keep 60 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer_keep" \
  --shapes qwen3next --impls ours --no-check --iters 10 --warmup 3 --keep-states
# issue 2 asks S1, S2 and S3 in one run next to fla (fla autotunes each shape for ~2 minutes)
[ "${SKIP_S2S1:-0}" = 1 ] || timed kernels-s2s1 420 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s2s1" \
  --shapes S2,S1 --bwd-stages --budget-s "$(( $(left) - 25 ))"
# the GPU test suite (issue 2: the kernel tests in bf16 and fp32 on the GPU; ~180 s on an H200)
# shellcheck disable=SC2086
[ -z "${ONLY:-}" ] || timed kernel-suite 300 $TESTS_CMD $TESTS_A $TESTS_B $TESTS_C $TESTS_D
# issue 2's figure in one run: S3, S2 and S1, ours (as it is and with the states kept) next to fla,
# checked at S3 and S2 first (KALL_CHECK; in KALL_DTYPES, bf16 by default: "bf16,fp32" adds
# fp32), and ours again with a backward change switched (KALL_AB: bench_kernels.py's --ab-*
# options; none by default). A warm machine that ran it once
# ran it again in 55 s
# (2026-12-07: Triton's on-disk cache kept the compiled kernels, and fla's autotuning no longer
# took ~2 minutes a shape).
KALL_AB="${KALL_AB:-}"
# shellcheck disable=SC2086
[ -z "${ONLY:-}" ] || timed kernels-all 540 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_all" \
  --shapes "${KALL_SHAPES:-S3,S2,S1}" --bwd-stages $KALL_AB --check \
  --check-shapes "${KALL_CHECK:-S3,S2}" --check-dtypes "${KALL_DTYPES:-bf16}" --budget-s "$(( $(left) - 25 ))"
pack
cat "$OUTDIR/summary.txt"
