#!/usr/bin/env bash
# One node, all its GPUs: torchrun --standalone (a local rendezvous, no coordinator to run).
#
#   bash examples/launch/single_node.sh [pretrain_gdn.py / Megatron flags...]
#   NPROC=8 bash examples/launch/single_node.sh --model-yaml examples/configs/gdn_1.3b.yaml \
#       --bf16 --tensor-model-parallel-size 2 --use-distributed-optimizer \
#       --data-path data/corpus_text_document --tokenizer-type HuggingFaceTokenizer \
#       --tokenizer-model Qwen/Qwen3-0.6B --seq-length 4096 --micro-batch-size 2 \
#       --global-batch-size 256 --train-iters 10000 --lr 3e-4 --out runs/gdn_1.3b
#
# NPROC defaults to the number of visible GPUs (nvidia-smi), else 2 (CPU + gloo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"

if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
# Megatron's TP/SP overlap needs one hardware queue per device so kernels run in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# NVLink SHARP (multicast) collectives stay off: not every driver/fabric setup supports them and
# NCCL's fallback on failure is a hang, not an error.
export NCCL_NVLS_ENABLE=0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  examples/pretrain_gdn.py "$@"
