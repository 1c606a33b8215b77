#!/usr/bin/env bash
# One GPU session's worth of checks and benchmarks, step by step, each with its own time
# limit and log; a failing step does not stop the others. Usage:
#   WHEELS=path/to/wheels [ARCHIVE=file.tgz] bash scripts/gpu_suite.sh OUTDIR STEP[:SECONDS] ...
# With ARCHIVE set, OUTDIR is packed into that file after every step (a run cut short by an
# outer time limit still leaves the finished steps' logs).
# Steps: tests-kernels tests-gpu bench-kernels bench-layer bench-hybrid bench-ssd bench-generate
#        train-1gpu layer-tp2 cp-parity bench-cp train-multi deepspeed
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$1"; shift
mkdir -p "$OUTDIR"
source "$ROOT/scripts/gpu_setup.sh" 2>&1 | tee "$OUTDIR/setup.log"
export PYTHONPATH="${MEGATRON_GDN_SITE:-/tmp/megatron_gdn_site}:$ROOT:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
cd "$ROOT"

step_cmd() {
  case "$1" in
    tests-kernels)  echo "MEGATRON_GDN_AUTOTUNE=0 python3 -m pytest tests/kernels -q -p no:warnings -rf --durations=15" ;;
    tests-gpu)      echo "MEGATRON_GDN_AUTOTUNE=0 python3 -m pytest tests/kernels tests/layer/test_layer_single.py -q -p no:warnings" ;;
    bench-kernels)  echo "python3 benchmarks/bench_kernels.py --out $OUTDIR/kernels --shapes S1,S2,S3,S4,S5 --check --bwd-stages --budget-s $(( $2 - 25 ))" ;;
    bench-layer)    echo "python3 benchmarks/bench_layer.py --out $OUTDIR/layer" ;;
    bench-hybrid)   echo "python3 benchmarks/bench_hybrid.py --out $OUTDIR/hybrid" ;;
    bench-ssd)      echo "python3 benchmarks/bench_ssd.py --out $OUTDIR/ssd" ;;
    bench-generate) echo "python3 benchmarks/bench_generate.py --out $OUTDIR/generate" ;;
    train-1gpu)     echo "bash examples/launch/gpu_throughput.sh $OUTDIR/train" ;;
    layer-tp2)      echo "torchrun --nproc_per_node 2 benchmarks/bench_layer.py --tp-parity --out $OUTDIR/layer_tp2" ;;
    cp-parity)      echo "torchrun --nproc_per_node $NGPU benchmarks/bench_cp.py --parity-tokens 8192 --seq 32768 --layers 2 --impl ours --warmup 1 --iters 3 --out $OUTDIR/cp_parity" ;;
    bench-cp)       echo "torchrun --nproc_per_node $NGPU benchmarks/bench_cp.py --out $OUTDIR/cp$NGPU --seq 131072 262144 524288 1048576 2097152 --layers 2 --impl ours --warmup 1 --iters 3" ;;
    train-multi)    echo "NPROC=$NGPU bash examples/launch/single_node.sh --model-yaml examples/configs/gdn_1.3b.yaml --bf16 --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --seq-length 32768 --max-position-embeddings 32768 --context-parallel-size $NGPU --micro-batch-size 1 --global-batch-size 1 --train-iters 20 --lr 3e-4 --lr-warmup-iters 2 --log-interval 1 --eval-iters 0 --eval-interval 1000000 --no-save --out $OUTDIR/train_cp$NGPU" ;;
    deepspeed)      echo "python3 -m pip install -q --no-index --no-deps --no-compile --target ${MEGATRON_GDN_SITE:-/tmp/megatron_gdn_site} $ROOT/.whl/deepspeed/*.whl && bash examples/launch/gpu_deepspeed_compare.sh $OUTDIR/deepspeed" ;;
    *) return 1 ;;
  esac
}

declare -a SUMMARY
for spec in "$@"; do
  name="${spec%%:*}"; limit="${spec#*:}"; [ "$limit" = "$spec" ] && limit=300
  cmd="$(step_cmd "$name" "$limit")" || { SUMMARY+=("$name: unknown step"); continue; }
  echo "=== $name (limit ${limit}s): $cmd" | tee "$OUTDIR/$name.log"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$OUTDIR/$name.log" 2>&1
  rc=$?
  SUMMARY+=("$name: rc=$rc in $(( $(date +%s) - start ))s")
  tail -n 25 "$OUTDIR/$name.log"
  [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$OUTDIR" .
done
echo "=== summary ($NGPU GPU(s): $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))'))"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUTDIR/summary.txt"
