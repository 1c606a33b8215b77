"""The Triton backward of the chunked gated delta rule on one GPU: its launches one by one
(where the backward's time goes) and fwd+bwd next to fla 0.6.0, then a gradient check at real
shapes (timings first: the float64 reference is slow).

    python benchmarks/profile_chunk_bwd.py --out benchmarks/logs/bwd

Correctness of what is timed: tests/kernels/test_chunk_bwd.py (fp64 recurrence, CPU
interpreter and GPU) and the check below (every gradient against the pure-torch chunked path in
float64 on the same GPU, bf16 and fp32 inputs, dense and packed, GVA, K = 256 / V = 512). The
stages: prep forming Tm or reading the forward's (prep_ms, prep_saved_tm_ms), the state
recompute, qdo, dh (and dh_no_prefetch_ms: the pass with its per-step loads left to Triton's
pipeliner, chunk_bwd.DH_PREFETCH_MAX_K; dh_qdo_inline_ms: the key decay launch and the pass
forming qdo itself), the state recompute and the reverse pass together as the backward runs
them (state_dh_ms), the gradient stage
(grads_ms =
its two launches, each also alone: grads_vq_ms, grads_k_ms) and the whole backward
(bwd_total_ms, without a saved Tm).
Workload as in bench_kernels.py: fused l2-norm, g = logsigmoid, beta = sigmoid, scale K^-0.5.
fla refuses its backward on Hopper with triton < 3.7.1; this script sets
fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True to time it.
"""
import argparse
import json
import os
import sys
import time

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import bench_kernels as bk  # noqa: E402
from tolerance import BF16_REL, TF32_REL  # noqa: E402

from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb  # noqa: E402
from megatron_gdn.kernels.gated_delta_rule import chunk_fwd as cf  # noqa: E402
from megatron_gdn.kernels.gated_delta_rule.torch_ref import chunk_gated_delta_rule_torch  # noqa: E402

SHAPES = {"S1": (4, 4096, 16, 16, 128, 128), "S2": (1, 32768, 16, 16, 128, 128),
          "S3": (2, 8192, 16, 32, 128, 128), "S4": (4, 4096, 6, 6, 256, 512)}
CHECKS = [
    ((2, 1024, 4, 8, 128, 128), None),
    ((1, 1500, 4, 4, 128, 128), [0, 1, 700, 1000, 1001, 1500]),
    ((1, 600, 2, 2, 256, 512), [0, 100, 600]),
]


def reference64(q, k, v, g, beta, h0=None, final=False, cu=None):
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, None, h0, final, cu, use_qk_l2norm=True)


def check(shape, cu_list, dtype):
    B, T, H, HV, K, V = shape
    cu = torch.tensor(cu_list, dtype=torch.int32, device="cuda") if cu_list else None
    N = B if cu is None else len(cu_list) - 1
    inputs = bk.make_inputs(B, T, H, HV, K, V, dtype, seed=11, with_state=True, N=N)
    gen = torch.Generator(device="cuda").manual_seed(12)
    do = torch.randn(B, T, HV, V, device="cuda", generator=gen).to(dtype)
    dht = torch.randn(N, HV, K, V, device="cuda", generator=gen)
    got = bk.grads_of(bk.ours, inputs, do, dht, cu)
    ref = bk.grads_of(reference64, [x.double() for x in inputs], do.double(), dht.double(), cu)
    errs = {key: bk.rel(got[key], ref[key]) for key in ref}
    tol = BF16_REL if dtype == torch.bfloat16 else TF32_REL
    ok = all(torch.isfinite(got[key]).all().item() for key in got) and all(
        e <= tol for e in errs.values())
    return {"shape": list(shape), "packed": cu_list is not None, "dtype": str(dtype),
            "errors": errs, "tol": tol, "ok": ok}


def backward_stages(shape, dtype=torch.bfloat16):
    """Each launch of our backward, timed alone with the inputs the forward leaves."""
    B, T, H, HV, K, V = shape
    q, k, v, g, beta, _ = bk.make_inputs(B, T, H, HV, K, V, dtype, seed=3)
    layout = cf.make_chunk_layout(None, B, T)
    gc, beta_act, k_rstd, w, u = cf.chunk_prepare_fwd(k, v, g, beta, layout, use_qk_l2norm=True)
    h, v_new, _ = cf.chunk_state_fwd(k, w, u, gc, layout, k_rstd=k_rstd)
    _, q_rstd = cf.chunk_output_fwd(q, k, v_new, h, gc, K ** -0.5, layout, k_rstd=k_rstd,
                                    use_qk_l2norm=True)
    do = torch.randn_like(v)
    g_act = g.float().contiguous()  # the workload's g is the per-token log decay itself
    scale = K ** -0.5
    tm = torch.empty(B, T, HV, 64, dtype=v.dtype, device="cuda")
    dv_buf = torch.empty_like(v)
    dh = torch.empty_like(h)
    # as chunk_gated_delta_rule_bwd runs it: with GVA one program per value head, dq / dk per
    # value head (the group sum is a separate small launch, timed in bwd_total only)
    loop_g = 1

    def prep(has_tm=False):
        # has_tm: Tm saved by the forward (read back from tm, which the run without fills)
        return lambda: cb.launch_prep(q, k, v, g_act, gc, beta_act, q_rstd, k_rstd, do, tm, w, u,
                                      dv_buf, scale, layout, has_tm)

    def state():
        cf.chunk_state_fwd(k, w, u, gc, layout, k_rstd=k_rstd)

    kscale = cb.launch_qdo(q, gc, q_rstd, do, dh, scale, layout, g_act, k_rstd)

    def qdo():
        cb.launch_qdo(q, gc, q_rstd, do, dh, scale, layout, g_act, k_rstd)

    def dh_pass(prefetch=None):
        # the pass alone, reading the qdo launch's tiles back
        cb.launch_dh_pass(q, k, w, gc, q_rstd, kscale, do, dv_buf, None, dh, None, scale, layout,
                          inline=False, prefetch=prefetch)

    def dh_qdo_inline():
        # the key decay alone, then the pass forming (scale q e^gc)^T do itself: against qdo + dh
        cb.launch_dh(q, k, w, gc, q_rstd, k_rstd, do, dv_buf, None, dh, None, scale, layout,
                     g_act, inline=True)

    def state_dh():
        # the state pass again and the reverse pass as the backward runs them (the reverse pass
        # forming qdo as launch_dh decides)
        cb.launch_state_and_dh(q, k, w, u, gc, q_rstd, k_rstd, do, dv_buf, None, dh, None, None,
                               scale, layout, g_act)

    def grads():
        cb.launch_grads(q, k, v, g_act, gc, beta_act, q_rstd, k_rstd, tm, h, dh, v_new, dv_buf,
                        do, scale, layout, loop_g)

    def whole():
        cb.chunk_gated_delta_rule_bwd(q, k, v, gc, beta_act, scale, None, do, None, layout,
                                      q_rstd=q_rstd, k_rstd=k_rstd, g=g_act)

    res = {}
    # the two gradient launches apart, as launch_grads runs them (the k launch reads the vq
    # launch's scratch and adds to its dg / dbeta)
    vq_out = cb.launch_grad_vq(q, k, v, g_act, gc, beta_act, q_rstd, k_rstd, tm, h, v_new, dv_buf,
                               do, scale, layout, loop_g)

    def grads_vq():
        cb.launch_grad_vq(q, k, v, g_act, gc, beta_act, q_rstd, k_rstd, tm, h, v_new, dv_buf, do,
                          scale, layout, loop_g)

    def grads_k():
        _, _, dg, dbeta, pm, m2 = vq_out
        cb.launch_grad_k(q, k, g_act, gc, beta_act, q_rstd, k_rstd, tm, h, dh, v_new, dv_buf, pm, m2,
                         dg, dbeta, layout, loop_g)

    for name, fn in (("prep", prep()), ("prep_saved_tm", prep(True)), ("state", state),
                     ("qdo", qdo), ("dh", dh_pass),
                     # the pass as before its hand prefetch (same autotuned config)
                     ("dh_no_prefetch", lambda: dh_pass(False)),
                     ("dh_qdo_inline", dh_qdo_inline),
                     ("state_dh", state_dh),
                     ("grads", grads), ("grads_vq", grads_vq), ("grads_k", grads_k),
                     ("bwd_total", whole)):
        fn()
        res[name + "_ms"] = bk.bench_ms(fn)
    kernels = ("_bwd_prep_kernel", "_bwd_dh_kernel", "_bwd_grad_vq_kernel", "_bwd_grad_k_kernel")
    for name in kernels:
        res[name] = str(getattr(getattr(cb, name), "best_config", None))
    for name in kernels:
        try:
            for caches in getattr(cb, name).fn.device_caches.values():
                for ck in caches[0].values():
                    res.setdefault("regs_spills", []).append(
                        [name, ck.metadata.num_warps, ck.n_regs, ck.n_spills])
        except Exception as e:  # only diagnostics: triton internals differ across versions
            res["regs_spills_error"] = repr(e)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="S1,S2,S3")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
               "checks": [], "stages": {}, "fwd_bwd": {}}

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    fla = bk.fla_fn()
    for sid in args.shapes.split(","):
        shape = SHAPES[sid]
        st = backward_stages(shape)
        bk.log(sid, "stages", st)
        results["stages"][sid] = st
        save()
        row = {"ours": bk.time_impl(bk.ours, shape), "fla": bk.time_impl(fla, shape)}
        bk.log(sid, "fwd/fwd_bwd", row)
        results["fwd_bwd"][sid] = row
        save()
    if not args.no_check:
        for shape, cu in CHECKS:
            for dtype in (torch.bfloat16, torch.float32):
                try:
                    r = check(shape, cu, dtype)
                except Exception as e:  # report and go on with the other checks
                    r = {"shape": list(shape), "dtype": str(dtype), "error": repr(e)}
                bk.log("check", r)
                results["checks"].append(r)
                save()

if __name__ == "__main__":
    main()
