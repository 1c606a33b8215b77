#!/usr/bin/env bash
# Several nodes: run this same command on every node (by hand, pdsh, or a scheduler).
# torchrun's c10d rendezvous: every node connects to MASTER_ADDR:MASTER_PORT (a host that all
# nodes can reach, usually node 0) and they agree on ranks; no separate coordinator process.
#
#   MASTER_ADDR=node0 NNODES=4 NPROC=8 bash examples/launch/multi_node.sh \
#       --model-yaml examples/configs/gdn_1.3b.yaml --bf16 \
#       --tensor-model-parallel-size 2 --context-parallel-size 2 --use-distributed-optimizer \
#       --data-path /shared/data/corpus_text_document --tokenizer-type HuggingFaceTokenizer \
#       --tokenizer-model Qwen/Qwen3-0.6B --seq-length 32768 --micro-batch-size 1 \
#       --global-batch-size 64 --train-iters 10000 --lr 3e-4 --out /shared/runs/gdn_1.3b
#
# Variables: MASTER_ADDR (required), MASTER_PORT (29500), NNODES (required), NPROC (GPUs per
# node, 8), RDZV_ID (a job id shared by the nodes, default gdn-$MASTER_ADDR-$MASTER_PORT),
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA (your fabric's interfaces, if NCCL picks wrong ones).
# Checkpoints (--save/--load, --out) and data must be on storage every node sees.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"

: "${MASTER_ADDR:?set MASTER_ADDR to a host every node can reach (usually node 0)}"
: "${NNODES:?set NNODES to the number of nodes}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-8}"
RDZV_ID="${RDZV_ID:-gdn-$MASTER_ADDR-$MASTER_PORT}"

export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_NVLS_ENABLE=0
# a rank that stops answering (a dead node) surfaces as an error instead of a silent hang
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  examples/pretrain_gdn.py "$@"
