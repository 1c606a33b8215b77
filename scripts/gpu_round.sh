#!/usr/bin/env bash
# One call on a 4-GPU (or 2-GPU) machine: the kernel benchmark (next to fla), the layer
# benchmark (next to Megatron's GDN), the GPU test suite and Megatron-LM's pretrain_gpt.py with
# our spec side by side on separate GPUs; with 4 GPUs also the CP=1 length sweep and the dh-pass
# config check (benchmarks/diag_configs.py). ~480 s on 4 x H200. OUTDIR.tgz holds the logs after
# every phase.
#   WHEELS=path/to/wheels bash scripts/gpu_round.sh OUTDIR
# Every job has its own time limit and log (OUTDIR/*.log); a failing job does not stop others.
#   source scripts/gpu_round.sh --functions-only OUTDIR   (set up, define the jobs, run none)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUNCTIONS_ONLY=0
if [ "${1:-}" = "--functions-only" ]; then FUNCTIONS_ONLY=1; shift; fi
OUTDIR="$1"
mkdir -p "$OUTDIR"
: "${WHEELS:=$ROOT/.whl}"
source "$ROOT/scripts/gpu_setup.sh" > "$OUTDIR/setup.log" 2>&1 || { cat "$OUTDIR/setup.log"; exit 1; }
# gpu_setup.sh sets errexit; left on, every job that ended non-zero (a failed test, a time
# limit) ended its whole lane before its summary line, and the lane's later jobs never ran
set +e
export PYTHONPATH="${MEGATRON_GDN_SITE:-/tmp/megatron_gdn_site}:$ROOT:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$ROOT"
python3 -c "import fla, megatron.core; print('fla', fla.__version__, 'megatron-core', megatron.core.__version__)" >> "$OUTDIR/setup.log" 2>&1
# the card(s) of this call, for the figures' records (every round script sources this set-up)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/gpu.txt" 2>&1
cat "$OUTDIR/setup.log"

# the GPU test suite (run as one pytest-xdist job below)
TESTS_A="tests/kernels/test_gated_delta_rule.py"
TESTS_B="tests/kernels/test_chunk_bwd.py tests/kernels/test_chunk_internals.py
  tests/kernels/test_chunk_entry.py tests/kernels/test_errors.py tests/kernels/test_tuning.py
  tests/kernels/test_streams.py"
TESTS_C="tests/kernels/test_recurrent.py tests/kernels/test_conv1d.py tests/kernels/test_gated_norm.py
  tests/kernels/test_naive.py"
TESTS_D="tests/kernels/test_ssd.py tests/layer/test_layer_single.py tests/hybrid/test_attention.py"

job() {  # job NAME SECONDS GPUS COMMAND...
  local name="$1" secs="$2" gpus="$3"; shift 3
  local start=$(date +%s)
  echo "=== $name (GPUs $gpus, limit ${secs}s): $*" > "$OUTDIR/$name.log"
  echo "$name: started at $(date +%T)" >> "$OUTDIR/summary.txt"
  local rc=0
  # a session of its own, so that nothing a job signals reaches the lanes
  CUDA_VISIBLE_DEVICES="$gpus" setsid --wait timeout --kill-after=10 "$secs" "$@" \
    >> "$OUTDIR/$name.log" 2>&1 || rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start ))s, ended at $(date +%T)" | tee -a "$OUTDIR/summary.txt"
}

# Megatron-LM's own pretrain_gpt.py (tag core_v0.19.0, with its gpt_builders.py and
# model_provider.py, in .megatron-lm/: git-ignored, carried) with our spec: the README's 1.3B
# command, 20 iterations.  pretrain_gpt GPU SECONDS
pretrain_gpt() {
  [ -f .megatron-lm/pretrain_gpt.py ] || { echo "pretrain-gpt: no .megatron-lm/pretrain_gpt.py" | tee -a "$OUTDIR/summary.txt"; return; }
  job pretrain-gpt "$2" "$1" python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m megatron_gdn.run_script .megatron-lm/pretrain_gpt.py --spec megatron_gdn.specs gdn_layer_spec \
    --num-layers 21 --hidden-size 2048 --ffn-hidden-size 5632 --swiglu --num-attention-heads 16 \
    --linear-num-key-heads 6 --linear-num-value-heads 6 --linear-key-head-dim 256 \
    --linear-value-head-dim 512 --normalization RMSNorm --position-embedding-type none \
    --seq-length 4096 --max-position-embeddings 4096 --bf16 --mock-data \
    --tokenizer-type NullTokenizer --vocab-size 32000 --micro-batch-size 2 \
    --global-batch-size 4 --train-iters 20 --lr 3e-4 --transformer-impl local \
    --hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0 \
    --eval-interval 1000000
}

SEQS_CP="131072 262144 524288 1048576 2097152"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
# the stdlib text corpus of the README's CPU run, in Megatron's format with byte tokens, for the
# multi-GPU training jobs.  stdlib_corpus DIR MB (DIR/stdlib_text_document; log on stdout)
stdlib_corpus() {
  python3 examples/data/build_corpus.py --out "$1" --max-mb "$2" \
    && python3 examples/data/preprocess.py --input "$1/stdlib.jsonl" \
         --output-prefix "$1/stdlib" --tokenizer-type ByteTokenizer
}
# logs and results only: a checkpoint (a 1.3B ZeRO one is ~16 GB) would outlast the call
pack() { tar czf "$OUTDIR.tgz" --exclude=checkpoints --exclude='*.pt' --exclude='*.distcp' \
           -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"; }
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
TESTS_CMD="env MEGATRON_GDN_AUTOTUNE=0 python3 -m pytest $XDIST -v -p no:warnings -p no:cacheprovider --tb=short -rf"
if [ "$FUNCTIONS_ONLY" = 1 ]; then
  return 0
elif [ "$NGPU" -ge 4 ]; then
  # phase 1 (<= 330 s), one lane per GPU: the kernel benchmark split in two (S3 alone, then the
  # CP=1 length sweep; S2 and S1: fla's autotuning takes ~150 s a shape, one job of three shapes
  # ran past 310 s), the layer benchmark (Megatron's first call autotunes fla for ~180 s), the
  # whole GPU test suite (pytest-xdist, eight workers; -v names each failure as it happens)
  # then Megatron-LM's pretrain_gpt.py. The CP=4 sweeps are in gpu_round_models.sh.
  ( job kernels-s3 230 0 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s3" --shapes S3 --bwd-stages --budget-s 190
    job cp1 110 0 torchrun --nproc_per_node 1 --master_port 29514 benchmarks/bench_cp.py \
      --out "$OUTDIR/cp1" --seq 32768 $SEQS_CP --layers 2 --impl ours --parity-tokens 0 --warmup 1 \
      --iters 3 --profile-seq 32768 ) &
  job kernels-s2s1 330 1 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels_s2s1" --shapes S2,S1 --bwd-stages --budget-s 290 &
  job layer 330 2 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer" --shapes qwen3next --iters 10 --warmup 3 &
  ( job tests 250 3 $TESTS_CMD $TESTS_A $TESTS_B $TESTS_C $TESTS_D
    pretrain_gpt 3 95 ) &
  wait; pack
  # phase 2 (<= 190 s): which dh-pass configs are exact on this GPU and how fast at S2, each
  # pinned in its own process (4-warp configs read out of bounds on H200 in run 7), and at S3
  # pipelined candidates for the gradient launches
  job diag-dh 190 0,1,2,3 python3 benchmarks/diag_configs.py --out "$OUTDIR/diag_dh"
else
  # two GPUs: the kernel benchmark beside the whole GPU test suite (pytest-xdist, eight
  # workers: the tests are compile- and launch-bound; -v names each failure as it happens),
  # then the layer benchmark beside Megatron-LM's pretrain_gpt.py with our spec
  job kernels 310 0 python3 benchmarks/bench_kernels.py --out "$OUTDIR/kernels" --shapes S3,S2,S1 --bwd-stages --budget-s 250 &
  job tests 290 1 $TESTS_CMD $TESTS_A $TESTS_B $TESTS_C $TESTS_D &
  wait
  job layer 230 0 python3 benchmarks/bench_layer.py --out "$OUTDIR/layer" --shapes qwen3next --iters 10 --warmup 3 &
  pretrain_gpt 1 230 &
  wait
fi
pack
echo "=== summary ($(python3 -c 'import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))'))"
cat "$OUTDIR/summary.txt"
