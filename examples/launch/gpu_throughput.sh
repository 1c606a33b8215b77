#!/usr/bin/env bash
# Training throughput on one GPU: the GDN 1.3B, H1 1.3B and Qwen3-Next-style presets at 4K
# context in bf16, Megatron's random tokens (--mock-data), 30 iterations each; tokens/s/GPU and
# MFU over the iterations after the first 5 land in OUTDIR/<model>/summary.json and the log.
#
#   bash examples/launch/gpu_throughput.sh OUTDIR [MODEL ...]     # default: all three
#
# Extra Megatron flags can go in EXTRA (e.g. EXTRA="--recompute-granularity selective").
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUTDIR="${1:?usage: gpu_throughput.sh OUTDIR [MODEL ...]}"; shift
MODELS=("$@"); [ ${#MODELS[@]} -gt 0 ] || MODELS=(gdn_1.3b gdn_h1_1.3b qwen3_next_style)
PYTHON="${PYTHON:-python3}"
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
mkdir -p "$OUTDIR"
for model in "${MODELS[@]}"; do
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 examples/pretrain_gdn.py \
    --model-yaml "examples/configs/$model.yaml" --bf16 --mock-data \
    --tokenizer-type NullTokenizer --vocab-size 32000 --seq-length 4096 \
    --max-position-embeddings 4096 --micro-batch-size "${MBS:-4}" --global-batch-size "${GBS:-16}" \
    --train-iters "${ITERS:-30}" --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 1 \
    --log-interval 1 --eval-iters 0 --eval-interval 1000000 --no-save \
    --throughput-warmup 5 --out "$OUTDIR/$model" ${EXTRA:-} 2>&1 | tee "$OUTDIR/$model.log" | grep -E "iteration|tokens|MFU|Error" | tail -8
done
