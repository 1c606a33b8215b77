#!/usr/bin/env bash
# The backward's two gradient launches (_bwd_grad_vq_kernel, _bwd_grad_k_kernel) pinned to one
# config at a time at a benchmark shape, each pin in its own process (benchmarks/diag_configs.py
# --one; everything else autotuned as in training): every gradient's relative error against the
# fp32 torch path and the fwd+bwd median. One "RESULT {json}" line per pin, after a "PIN" line.
# A pin is BV:warps:stages[:BK[:maxnreg]] (BK, the dk launch's key-column block) or "auto".
#   bash scripts/gpu_grads_sweep.sh SHAPE "auto 64:16:1:64 ..."
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHAPE="${1:?usage: gpu_grads_sweep.sh SHAPE PINS}"
for pin in $2; do
  echo "PIN $SHAPE grads=$pin"
  MEGATRON_GDN_AUTOTUNE=1 python3 "$ROOT/benchmarks/diag_configs.py" --one "$SHAPE" auto auto "$pin" \
    2>&1 | grep -E "^RESULT|Error" | tail -3
done
