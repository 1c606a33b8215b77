#!/usr/bin/env bash
# The GDN 1.3B preset on 2 GPUs, bf16, 4K context: DeepSpeed ZeRO-1/2/3 (examples/
# pretrain_gdn_deepspeed.py) next to Megatron's own distributed optimizer (examples/
# pretrain_gdn.py --use-distributed-optimizer) at the same micro-batch, data-parallel size and
# TP size; tokens/s and each run's peak GPU memory land in OUTDIR/<run>.log and
# OUTDIR/<run>/metrics.jsonl.
#
#   bash examples/launch/gpu_deepspeed_compare.sh OUTDIR [TP ...]     # default TP sizes: 1 2
#
# DeepSpeed must be importable (on an offline GPU machine: its wheel and its needs, e.g.
# `pip install --no-index --target SITE .whl/deepspeed/*.whl`). ITERS (20) and MBS (2) set the
# length and the micro-batch.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUTDIR="${1:?usage: gpu_deepspeed_compare.sh OUTDIR [TP ...]}"; shift
TPS=("$@"); [ ${#TPS[@]} -gt 0 ] || TPS=(1 2)
PYTHON="${PYTHON:-python3}"
NPROC=2 ITERS="${ITERS:-20}" MBS="${MBS:-2}" YAML=examples/configs/gdn_1.3b.yaml
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
mkdir -p "$OUTDIR"
run() {  # run NAME COMMAND...
  local name="$1"; shift
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@" \
    > "$OUTDIR/$name.log" 2>&1
  echo "$name: rc=$? | $(grep -E 'tokens/s' "$OUTDIR/$name.log" | tail -1)"
}
for tp in "${TPS[@]}"; do
  dp=$((NPROC / tp))
  for zero in 1 2 3; do
    run "zero${zero}_tp${tp}" examples/pretrain_gdn_deepspeed.py --model-yaml "$YAML" \
      --ds-config "examples/deepspeed/zero${zero}.json" --tensor-model-parallel-size "$tp" \
      --seq-length 4096 --micro-batch-size "$MBS" --train-iters "$ITERS" --lr 3e-4 \
      --no-save --out "$OUTDIR/zero${zero}_tp${tp}"
  done
  run "distopt_tp${tp}" examples/pretrain_gdn.py --model-yaml "$YAML" --bf16 --mock-data \
    --tokenizer-type NullTokenizer --vocab-size 32000 --seq-length 4096 \
    --max-position-embeddings 4096 --tensor-model-parallel-size "$tp" \
    --use-distributed-optimizer --micro-batch-size "$MBS" --global-batch-size $((MBS * dp)) \
    --train-iters "$ITERS" --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2 --log-interval 1 \
    --eval-iters 0 --eval-interval 1000000 --no-save --throughput-warmup 3 \
    --out "$OUTDIR/distopt_tp${tp}"
done
