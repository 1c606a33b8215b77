#!/usr/bin/env bash
# One call on a 4-GPU (or 2-GPU) machine: the kernel benchmark (next to fla), the layer
# benchmark (next to Megatron's GDN) and the GPU test suite side by side on separate GPUs; with
# 4 GPUs also TP=2 parity and the context-parallel sweeps (CP=4 on all four GPUs; then CP=2
# and CP=1 side by side).
#   WHEELS=path/to/wheels bash scripts/gpu_round.sh OUTDIR
# Every job has its own time limit and log (OUTDIR/*.log); a failing job does not stop others.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"
mkdir -p "$OUTDIR"
: "${WHEELS:=$ROOT/.whl}"
source "$ROOT/scripts/gpu_setup.sh" > "$OUTDIR/setup.log" 2>&1 || { cat "$OUTDIR/setup.log"; exit 1; }
export PYTHONPATH="${MEGATRON_GDN_SITE:-/tmp/megatron_gdn_site}:$ROOT:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# the forward prepare kernel the round measures (kernels/gated_delta_rule/chunk_fwd.py
# prep_variant; the benchmark's stage split times both either way; the tests run both)
export MEGATRON_GDN_FWD_PREP="${MEGATRON_GDN_FWD_PREP:-new}"
cd "$ROOT"
python3 -c "import fla, megatron.core; print('fla', fla.__version__, 'megatron-core', megatron.core.__version__)" >> "$OUTDIR/setup.log" 2>&1
cat "$OUTDIR/setup.log"

# the GPU test suite in four groups of about equal time, two pytest processes per GPU (the
# tests are launch-latency bound); --durations names the slow ones in the logs
TESTS_A="tests/kernels/test_gated_delta_rule.py"
TESTS_B="tests/kernels/test_chunk_bwd.py tests/kernels/test_chunk_internals.py
  tests/kernels/test_chunk_entry.py tests/kernels/test_errors.py tests/kernels/test_tuning.py"
TESTS_C="tests/kernels/test_recurrent.py tests/kernels/test_conv1d.py tests/kernels/test_gated_norm.py
  tests/kernels/test_naive.py"
TESTS_D="tests/kernels/test_ssd.py tests/layer/test_layer_single.py"
PYTEST="env MEGATRON_GDN_AUTOTUNE=0 python3 -m pytest -q -p no:warnings -rf --durations=15"

job() {  # job NAME SECONDS GPUS COMMAND...
  local name="$1" secs="$2" gpus="$3"; shift 3
  local start=$(date +%s)
  echo "=== $name (GPUs $gpus, limit ${secs}s): $*" > "$OUTDIR/$name.log"
  CUDA_VISIBLE_DEVICES="$gpus" timeout --kill-after=10 "$secs" "$@" >> "$OUTDIR/$name.log" 2>&1
  echo "$name: rc=$? in $(( $(date +%s) - start ))s" | tee -a "$OUTDIR/summary.txt"
}

SEQS_CP="131072 262144 524288 1048576 2097152"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$NGPU" -ge 4 ]; then
  # phase 1 (<= 260 s): four independent jobs, one GPU each
  job kernels 260 0 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels" --shapes S1,S2,S3 --bwd-stages --budget-s 235 &
  job layer 240 1 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer" --shapes qwen3next --iters 10 --warmup 3 &
  job layer-1.3b 240 2 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer_1.3b" --shapes gdn1.3b --iters 10 --warmup 3 &
  ( job tests-a 200 3 $PYTEST $TESTS_A & job tests-b 200 3 $PYTEST $TESTS_B &
    job tests-c 200 3 $PYTEST $TESTS_C & job tests-d 200 3 $PYTEST $TESTS_D & wait ) &
  wait
  # phase 2 (<= 100 s): TP=2 parity on two GPUs; CP=1 length sweep (1.3B dims, 2 layers) on a third
  job layer-tp2 100 0,1 torchrun --nproc_per_node 2 --master_port 29511 benchmarks/bench_layer.py \
    --tp-parity --out "$OUTDIR/layer_tp2" &
  job cp1 100 2 torchrun --nproc_per_node 1 --master_port 29514 benchmarks/bench_cp.py \
    --out "$OUTDIR/cp1" --seq $SEQS_CP --layers 2 --impl ours --parity-tokens 0 --warmup 1 --iters 3 &
  wait
  # phase 3 (<= 240 s): CP=4 with the bf16 parity check, then CP=2, lengths up to the first OOM
  job cp4 140 0,1,2,3 torchrun --nproc_per_node 4 --master_port 29512 benchmarks/bench_cp.py \
      --out "$OUTDIR/cp4" --seq $SEQS_CP --layers 2 --impl ours --parity-tokens 8192 --warmup 1 --iters 3
  job cp2 80 0,1 torchrun --nproc_per_node 2 --master_port 29513 benchmarks/bench_cp.py \
      --out "$OUTDIR/cp2" --seq $SEQS_CP --layers 2 --impl ours --parity-tokens 0 --warmup 1 --iters 3
else
  # two GPUs: the kernel benchmark beside the whole GPU test suite (pytest-xdist, eight
  # workers: the tests are compile- and launch-bound; -v names each failure as it happens),
  # then the layer benchmark beside Megatron-LM's pretrain_gpt.py with our spec
  job kernels 310 0 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels" --shapes S1,S2,S3 --bwd-stages --budget-s 250 &
  job tests 290 1 env MEGATRON_GDN_AUTOTUNE=0 python3 -m pytest -n 8 -v -p no:warnings -p no:cacheprovider \
      --tb=short -rf $TESTS_A $TESTS_B $TESTS_C $TESTS_D &
  wait
  job layer 230 0 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer" --shapes qwen3next --iters 10 --warmup 3 &
  # Megatron-LM's own pretrain_gpt.py (tag core_v0.19.0, with its gpt_builders.py and
  # model_provider.py, in .megatron-lm/: git-ignored, carried) with our spec, the README's
  # 1.3B command, shortened
  if [ -f .megatron-lm/pretrain_gpt.py ]; then
    job pretrain-gpt 230 1 python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
      -m megatron_gdn.run_script .megatron-lm/pretrain_gpt.py --spec megatron_gdn.specs gdn_layer_spec \
      --num-layers 21 --hidden-size 2048 --ffn-hidden-size 5632 --swiglu --num-attention-heads 16 \
      --linear-num-key-heads 6 --linear-num-value-heads 6 --linear-key-head-dim 256 \
      --linear-value-head-dim 512 --normalization RMSNorm --position-embedding-type none \
      --seq-length 4096 --max-position-embeddings 4096 --bf16 --mock-data \
      --tokenizer-type NullTokenizer --vocab-size 32000 --micro-batch-size 2 \
      --global-batch-size 4 --train-iters 20 --lr 3e-4 --transformer-impl local \
      --hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0 \
      --eval-interval 1000000 &
  fi
  wait
fi
echo "=== summary ($(python3 -c 'import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))'))"
cat "$OUTDIR/summary.txt"
