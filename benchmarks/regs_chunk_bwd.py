"""Registers, stack and spills of the backward's gradient kernels on sm_90a, offline (no GPU):
each kernel compiled for Hopper as tests/hopper_compile.py does, its PTX run through Triton's
bundled `ptxas -v`. The two launches of the gradient stage (the one-launch kernel they replaced
took 255 registers and spilled 724 B per thread at K = V = 128), bf16, l2-norm and exact g on, at K = V = 128 and K = 256 / V = 512, BV 64 at 4 and 8 warps, one stage (the vq
launch with SPLIT_DQ 0 and 1, the dk launch at each key-column block).

    env -u TRITON_INTERPRET PYTHONPATH=. python benchmarks/regs_chunk_bwd.py

Correctness of these kernels: tests/kernels/test_chunk_bwd.py.
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hopper_compile import HOPPER_MAX_SHARED, compile_for_hopper, ptxas_usage  # noqa: E402

from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb  # noqa: E402

KERNELS = ("_bwd_grad_vq_kernel", "_bwd_grad_k_kernel")
FLOAT32 = ("gc", "g", "beta", "q_rstd", "k_rstd", "dg", "dbeta", "dk_raw", "dg_part", "dbeta_part")


def usage(fn, constexprs, num_warps):
    ptr = {n: "*bf16" for n in ("q", "k", "v", "do", "h", "dh", "v_new", "dv2", "dq", "dk", "dv",
                                "tm", "pm", "m2")}
    ptr.update({n: "*fp32" for n in FLOAT32}, cu_seqlens="*i32", chunk_indices="*i32")
    return ptxas_usage(compile_for_hopper(fn, ptr, constexprs, num_warps, 1, floats=("scale",)))


def main():
    for (K, V), name, warps in itertools.product([(128, 128), (256, 512)], KERNELS, (4, 8)):
        BK = cb._pow2(K)
        constexprs = dict(H=1, HV=2, K=K, V=V, BK=BK, BKC=min(BK, 64), BV=64, L2=True,
                          HAS_G=True, IS_VARLEN=False, LOOP_G=1)
        # the vq launch: dq's product in the first V loop or a second (its configs' SPLIT_DQ)
        variants = [(f" (SPLIT_DQ {s})", dict(constexprs, SPLIT_DQ=s)) for s in (0, 1)]
        if name == "_bwd_grad_k_kernel":
            # its key-column blocks (the config's BK, clamped to K); maxnreg is not applied here
            variants = [(f" (BK {bk})", dict(constexprs, BK=bk)) for bk in sorted(
                {c.kwargs["BK"] for c in cb._prune_grad_k(cb._GRAD_K_CONFIGS, {}, K=K)}, reverse=True)]
        for label, c in variants:
            u = usage(getattr(cb, name), c, warps)
            print(f"K={K} V={V} {name:20s} warps={warps} regs={u['regs']} stack={u['stack']} "
                  f"spill_st={u['spill_st']} spill_ld={u['spill_ld']} shared={u['shared']} "
                  f"(max {HOPPER_MAX_SHARED}){label}", flush=True)


if __name__ == "__main__":
    main()
