#!/usr/bin/env bash
# The reverse state pass (dh) pinned to one config at a time at a benchmark shape, each pin in
# its own process (benchmarks/diag_configs.py --one; the other launches autotuned as in
# training): every gradient's relative error against the fp32 torch path and the fwd+bwd
# median. One "RESULT {json}" line per pin, after a "PIN" line.
#   bash scripts/gpu_dh_sweep.sh SHAPE "auto BV:warps:stages:ROW_SCALE[:maxnreg] ..."
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHAPE="${1:?usage: gpu_dh_sweep.sh SHAPE PINS}"
for pin in $2; do
  echo "PIN $SHAPE dh=$pin"
  MEGATRON_GDN_AUTOTUNE=1 python3 "$ROOT/benchmarks/diag_configs.py" --one "$SHAPE" "$pin" auto \
    2>&1 | grep -E "^RESULT|Error" | tail -3
done
