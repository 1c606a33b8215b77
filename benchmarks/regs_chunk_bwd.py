"""Registers, stack and spills of the backward's gradient kernels on sm_90a, offline (no GPU):
each kernel compiled for Hopper as tests/hopper_compile.py does, its PTX run through Triton's
bundled `ptxas -v`. The two launches of the gradient stage (the one-launch kernel they replaced
took 255 registers and spilled 724 B per thread at K = V = 128), bf16, l2-norm and exact g on, at K = V = 128 and K = 256 / V = 512, BV 64 at 4 and 8 warps.

    env -u TRITON_INTERPRET PYTHONPATH=. python benchmarks/regs_chunk_bwd.py

Correctness of these kernels: tests/kernels/test_chunk_bwd.py.
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hopper_compile import HOPPER_MAX_SHARED, compile_for_hopper, shared_bytes  # noqa: E402

from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
KERNELS = ("_bwd_grad_vq_kernel", "_bwd_grad_k_kernel")
FLOAT32 = ("gc", "g", "beta", "q_rstd", "k_rstd", "dg", "dbeta")


def usage(fn, constexprs, num_warps):
    ptr = {n: "*bf16" for n in ("q", "k", "v", "do", "h", "dh", "v_new", "dv2", "dq", "dk", "dv",
                                "tm", "pm", "m2")}
    ptr.update({n: "*fp32" for n in FLOAT32}, cu_seqlens="*i32", chunk_indices="*i32")
    kernel = compile_for_hopper(fn, ptr, constexprs, num_warps, 1, floats=("scale",))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stack, st, ld = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                       r"(\d+) bytes spill loads", out).groups())
    return dict(regs=regs, stack=stack, spill_st=st, spill_ld=ld, shared=shared_bytes(kernel))


def main():
    for (K, V), name, warps in itertools.product([(128, 128), (256, 512)], KERNELS, (4, 8)):
        BK = cb._pow2(K)
        constexprs = dict(H=1, HV=2, K=K, V=V, BK=BK, BKC=min(BK, 64), BV=64, L2=True,
                          HAS_G=True, IS_VARLEN=False, LOOP_G=1)
        u = usage(getattr(cb, name), constexprs, warps)
        print(f"K={K} V={V} {name:20s} warps={warps} regs={u['regs']} stack={u['stack']} "
              f"spill_st={u['spill_st']} spill_ld={u['spill_ld']} shared={u['shared']} "
              f"(max {HOPPER_MAX_SHARED})", flush=True)


if __name__ == "__main__":
    main()
