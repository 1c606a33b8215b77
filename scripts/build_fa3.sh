#!/usr/bin/env bash
# Build the part of FlashAttention-3 that megatron_gdn/hybrid/swa_fa3.py uses: Hopper (sm_90a)
# forward and backward, bf16, head dim 128, causal and sliding-window (local) masks, plain rows
# and packed (varlen) documents. Everything else FA3 offers (fp16, fp8, other head dims,
# paged / split / append KV, softcap, pack-GQA, clusters, sm80) is left out, which takes the
# build from about 450 kernel files to 3 (2.6-3 minutes of wall time on 2 cores with two jobs,
# ~12 GB of memory at the peak: the backward's file takes 6.6 GB and 2.5-3 minutes alone).
#
#   FA_SRC=path/to/flash-attention bash scripts/build_fa3.sh [OUT]      # OUT defaults to .fa3
#
# FA_SRC: a checkout of https://github.com/Dao-AILab/flash-attention (tested at 0251105a,
# 2026-08-15) with its CUTLASS submodule (csrc/cutlass; or give CUTLASS=path/to/cutlass, tested
# at the submodule's commit 7127592). Needs nvcc >= 12.8 (CUDA_HOME, else PATH; the
# nvidia-cuda-nvcc / -runtime / -cccl / -crt / nvvm wheels of PyPI are enough, see
# scripts/fa3_toolchain.sh), g++, and a python3 whose torch is >= 2.9 for the headers
# (PYTHON=...). The extension uses torch's stable C ABI (FA3's flash_api_stable.cpp), so it loads
# into any torch >= 2.9 built for the same CUDA major version, not only the one it was built
# against. It needs the glibc / libstdc++ versions the summary line prints where it runs (built
# with Debian 12's g++ 12: glibc 2.34, GLIBCXX_3.4.29, as on Ubuntu 22.04 and later);
# static libstdc++ is not used because it would raise the glibc needed to 2.36.
#
# OUT then holds flash_attn_3/_C.abi3.so, FA3's flash_attn_interface.py (copied from FA_SRC) and
# a flash_attn_config.py naming what was left out. swa_fa3.py finds OUT through MGDN_FA3_DIR
# (default: the repository's .fa3, which git ignores; nothing of FA3 is committed here).
# JOBS (default: nproc, at most 3: each kernel file takes up to ~6.5 GB) compiles in parallel.
# PACK_SRC=1 also writes OUT/src.tar.xz (~1 MB: hopper/ and cutlass/include/), to build again
# on a machine without the checkout: untar it in DIR, then FA_SRC=DIR CUTLASS=DIR/cutlass.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/.fa3}" && cd "${1:-$ROOT/.fa3}" && pwd)"
: "${FA_SRC:?set FA_SRC to a flash-attention checkout}"
HOPPER="$FA_SRC/hopper"
CUTLASS="${CUTLASS:-$FA_SRC/csrc/cutlass}"
PYTHON="${PYTHON:-python3}"
[ -f "$HOPPER/flash_api_stable.cpp" ] || { echo "build_fa3: $HOPPER/flash_api_stable.cpp not found (FA_SRC must be a flash-attention checkout from 2025-09 or later)" >&2; exit 2; }
[ -f "$CUTLASS/include/cute/tensor.hpp" ] || { echo "build_fa3: no CUTLASS in $CUTLASS (run 'git submodule update --init csrc/cutlass' in FA_SRC, or set CUTLASS)" >&2; exit 2; }
if [ -n "${CUDA_HOME:-}" ]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC="$(command -v nvcc || true)"; fi
[ -x "$NVCC" ] || { echo "build_fa3: no nvcc (set CUDA_HOME or put nvcc on PATH)" >&2; exit 2; }
CUDA_DIR="$(cd "$(dirname "$NVCC")/.." && pwd)"
CUDA_VER="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
CUDA_MAJOR="${CUDA_VER%%.*}"
read -r TORCH_VER TORCH_CUDA TORCH_INC TORCH_LIB PY_INC < <("$PYTHON" - <<'EOF'
import os, sysconfig, torch
from torch.utils.cpp_extension import include_paths
print(torch.__version__, torch.version.cuda, include_paths()[0], os.path.join(os.path.dirname(torch.__file__), "lib"),
      sysconfig.get_paths()["include"])
EOF
)
# the sources' revisions (a tree without git: the newest file time) decide whether objects are kept
revision() { git -C "$1" rev-parse --short HEAD 2>/dev/null || find "$1" -type f -printf '%T@\n' | sort -n | tail -1; }
FA_REV="$(revision "$HOPPER")"
CUTLASS_REV="$(revision "$CUTLASS/include")"
echo "build_fa3: FA3 $FA_REV, CUTLASS $CUTLASS_REV, nvcc $CUDA_VER, torch $TORCH_VER (CUDA $TORCH_CUDA) headers -> $OUT"
if [ "${TORCH_CUDA%%.*}" != "$CUDA_MAJOR" ]; then
  echo "build_fa3: note: torch here is for CUDA $TORCH_CUDA and nvcc is $CUDA_VER; the library needs a torch for CUDA $CUDA_MAJOR.x where it runs" >&2
fi

# what is left out: FA3's own switches (hopper/setup.py reads the same names from the environment)
OFF="SPLIT PAGEDKV APPENDKV SOFTCAP PACKGQA FP16 FP8 CLUSTER HDIM64 HDIM96 HDIM192 HDIM256 SM8x"
DEFS=()
for f in $OFF; do DEFS+=("-DFLASHATTENTION_DISABLE_$f"); done
DEFS+=(-DFLASH_ATTENTION_DISABLE_HDIMDIFF64 -DFLASH_ATTENTION_DISABLE_HDIMDIFF192)
INCS=(-I"$HOPPER" -I"$CUTLASS/include" -I"$CUDA_DIR/include")
NVFLAGS=(-O3 -std=c++17 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda
         -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__
         -U__CUDA_NO_HALF2_OPERATORS__ -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90
         -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG -Xcompiler -fPIC --resource-usage
         -gencode=arch=compute_90a,code=sm_90a)
OBJ="$OUT/obj"
mkdir -p "$OBJ" "$OUT/flash_attn_3"
JOBS="${JOBS:-$(( $(nproc) < 3 ? $(nproc) : 3 ))}"

compile() {  # name source compiler...: an object is kept while its command and sources stay
  local name="$1" src="$2"; shift 2
  local t0=$SECONDS cmd="$FA_REV $CUTLASS_REV $* $src"
  if [ -f "$OBJ/$name.o" ] && [ "$(cat "$OBJ/$name.cmd" 2>/dev/null)" = "$cmd" ]; then
    echo "build_fa3: $name kept from an earlier build (same command, same sources)"; return 0
  fi
  rm -f "$OBJ/$name.o" "$OBJ/$name.cmd"
  if "$@" -c "$src" -o "$OBJ/$name.o" > "$OBJ/$name.log" 2>&1; then
    echo "$cmd" > "$OBJ/$name.cmd"
    echo "build_fa3: $name compiled in $(( SECONDS - t0 )) s"
  else
    echo "build_fa3: $name FAILED; the end of $OBJ/$name.log:" >&2; tail -20 "$OBJ/$name.log" >&2; return 1
  fi
}
T0=$SECONDS
pids=()
run() { compile "$@" & pids+=($!); while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done; }
run bwd_hdim128_bf16 "$HOPPER/instantiations/flash_bwd_hdim128_bf16_sm90.cu" "$NVCC" "${NVFLAGS[@]}" "${DEFS[@]}" "${INCS[@]}"
run fwd_hdim128_bf16 "$HOPPER/instantiations/flash_fwd_hdim128_bf16_sm90.cu" "$NVCC" "${NVFLAGS[@]}" "${DEFS[@]}" "${INCS[@]}"
run prepare_scheduler "$HOPPER/flash_prepare_scheduler.cu" "$NVCC" "${NVFLAGS[@]}" "${DEFS[@]}" "${INCS[@]}"
run flash_api_stable "$HOPPER/flash_api_stable.cpp" g++ -O3 -std=c++17 -fPIC -DPy_LIMITED_API=0x03090000 \
    -DTORCH_TARGET_VERSION=0x0209000000000000 "${DEFS[@]}" "${INCS[@]}" -I"$TORCH_INC" \
    -I"$TORCH_INC/torch/csrc/api/include" -I"$PY_INC"
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ "$fail" = 0 ] || exit 1

# link: the torch and CUDA runtime symbols resolve against the libraries torch has loaded where
# it runs (same sonames)
CUDART_LIB=""
for f in "$CUDA_DIR"/lib64/libcudart.so* "$CUDA_DIR"/lib/libcudart.so*; do
  [ -e "$f" ] && { CUDART_LIB="$f"; break; }
done
[ -n "$CUDART_LIB" ] || { echo "build_fa3: no libcudart.so under $CUDA_DIR" >&2; exit 2; }
g++ -shared -o "$OUT/flash_attn_3/_C.abi3.so" "$OBJ"/*.o -L"$TORCH_LIB" -Wl,--no-as-needed -ltorch_cpu -ltorch_cuda "$CUDART_LIB"
cp "$HOPPER/flash_attn_interface.py" "$OUT/"
"$PYTHON" - "$OUT" $OFF <<'EOF'
import sys
out, off = sys.argv[1], set(sys.argv[2:])
names = ["BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8", "VARLEN",
         "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x"]
flags = {f"FLASHATTENTION_DISABLE_{n}": n in off for n in names}
flags.update({"FLASHATTENTION_ENABLE_VCOLMAJOR": False, "FLASH_ATTENTION_DISABLE_HDIMDIFF64": True,
              "FLASH_ATTENTION_DISABLE_HDIMDIFF192": True})
with open(f"{out}/flash_attn_config.py", "w") as f:
    f.write("# written by megatron-gdn's scripts/build_fa3.sh: what this FlashAttention-3 build left out\n")
    f.write(f"CONFIG = {{'build_flags': {flags!r}}}\n")
with open(f"{out}/flash_attn_3/__init__.py", "w") as f:
    f.write("# written by megatron-gdn's scripts/build_fa3.sh: the package that holds _C\n")
EOF
if [ "${PACK_SRC:-0}" = 1 ]; then
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/cutlass"
  cp -r "$HOPPER" "$tmp/hopper"
  cp -r "$CUTLASS/include" "$tmp/cutlass/include"
  tar -cJf "$OUT/src.tar.xz" -C "$tmp" hopper cutlass
  rm -rf "$tmp"
  echo "build_fa3: sources packed in $OUT/src.tar.xz ($(du -h "$OUT/src.tar.xz" | cut -f1))"
fi
echo "build_fa3: $OUT/flash_attn_3/_C.abi3.so, $(du -h "$OUT/flash_attn_3/_C.abi3.so" | cut -f1), in $(( SECONDS - T0 )) s;" \
     "needs $(objdump -T "$OUT/flash_attn_3/_C.abi3.so" | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1)," \
     "$(objdump -T "$OUT/flash_attn_3/_C.abi3.so" | grep -o 'GLIBCXX_[0-9.]*' | sort -V | tail -1)"
