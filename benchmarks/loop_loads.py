"""Which loads of the chunk kernels' loops Triton's software pipeliner leaves as plain loads,
offline (no GPU): each kernel compiled for sm_90a as tests/hopper_compile.py does, at a
benchmark shape's dims in bf16, with each of its autotuned launch configs; per config the
registers / spills / shared memory (Triton's bundled ptxas), the loads inside `scf.for` bodies
that became cp.async copies (prefetched num_stages - 1 steps ahead) and those left as
`tt.load` (waited on where first used, at every step; `n_*` are the dh pass's loads issued a
step ahead by hand, waited on a step later). One stage prefetches nothing; register caps
(maxnreg) are not applied here. Only innermost loops are pipelined: the backward prep's loads
per value head (its outer loop over the group) stay plain at any stage count.

Found with it (twelfth session): the pipeliner only prefetches loads that reach a dot operand
within the same step, so the reverse state pass waited on its qdo tile, dv_local and decay
at every step (now loaded a step ahead by hand where K <= 128: `PREFETCH`).

    env -u TRITON_INTERPRET PYTHONPATH=<GPU triton>:. python benchmarks/loop_loads.py [S3|S4]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hopper_compile import compile_for_hopper, pointer_types, ptxas_usage  # noqa: E402

from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb  # noqa: E402
from megatron_gdn.kernels.gated_delta_rule import chunk_fwd as cf  # noqa: E402

# (H, HV, K, V) of the benchmark shapes (bench_kernels.SHAPES without B, T)
DIMS = {"S3": (16, 32, 128, 128), "S4": (6, 6, 256, 512)}
F32 = ("gc", "g", "beta", "q_rstd", "k_rstd", "dg", "dbeta", "kscale", "dk_raw", "dg_part",
       "dbeta_part", "dht", "dh0", "h0", "ht")
SCALARS = ("T", "NT_SEQ", "PAR_CLASS", "part_stride", "scale")


def loop_loads(ttgir: str):
    """(cp.async copies, names of plain tt.load results) inside scf.for bodies."""
    depth, copies, plain = 0, 0, []
    for line in ttgir.splitlines():
        s = line.strip()
        if "scf.for" in s:
            depth += 1
        if depth and "async_copy_global_to_local" in s:
            copies += 1
        if depth and "tt.load" in s:
            plain.append(s.split("=")[0].strip().lstrip("%"))
        if depth and s.startswith("scf.yield"):
            depth -= 1
    return copies, plain


def kernels(H, HV, K, V):
    """(name, kernel, constexprs, configs) as the launchers run them."""
    BK = cb._pow2(K)
    base = dict(H=H, HV=HV, K=K, V=V, L2=True, HAS_G=True, IS_VARLEN=False)
    dh = dict(base, BK=BK, USE_DHT=False, USE_H0=False, PREFETCH=cb.dh_prefetch(BK),
              QDO_INLINE=False)
    yield "bwd_prep", cb._bwd_prep_kernel, dict(base, BK=64, BV=64, HAS_TM=True,
                                                 STORE_U=False), cb._bwd_prep_kernel.configs
    yield "bwd_dh", cb._bwd_dh_kernel, dh, cb._DH_NARROW
    yield "bwd_dh_qdo_inline", cb._bwd_dh_kernel, dict(dh, QDO_INLINE=True), cb._DH_NARROW
    yield "bwd_grad_vq", cb._bwd_grad_vq_kernel, dict(base, BK=BK, BKC=min(BK, 64), LOOP_G=1), \
        cb._bwd_grad_vq_kernel.configs
    yield "bwd_grad_k", cb._bwd_grad_k_kernel, dict(base, LOOP_G=1), \
        cb._prune_grad_k(cb._GRAD_K_CONFIGS, {}, K=K)
    yield "state", cf._state_kernel, dict(base, BK=BK, USE_H0=False, STORE_FINAL=False,
                                          HAS_U=True, SAVE_STATES=True), cf._state_kernel.configs


def main(shape="S3"):
    H, HV, K, V = DIMS[shape]
    for name, fn, constexprs, configs in kernels(H, HV, K, V):
        ptr = pointer_types(fn, F32, skip=lambda n: n in SCALARS)
        for c in configs:
            kern = compile_for_hopper(fn, ptr, {**constexprs, **c.kwargs}, c.num_warps,
                                      c.num_stages, floats=("scale",))
            u = ptxas_usage(kern)
            copies, plain = loop_loads(kern.asm["ttgir"])
            print(f"{shape} {name:12s} {str(c.kwargs):28s} warps={c.num_warps} "
                  f"stages={c.num_stages} regs={u['regs']} spills={u['spill_st']}/{u['spill_ld']} "
                  f"shared={u['shared']} loop: {copies} cp.async, plain {plain}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
