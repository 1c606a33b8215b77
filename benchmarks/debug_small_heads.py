"""GPU diagnosis of the compiled chunk kernels at small head dims (K, V in {16, 32}): runs the
cases of tests/kernels/test_chunk_bwd.py in bf16 and fp32, each in its own process (a CUDA fault
poisons the process), and reports per launch of the backward whether its outputs are finite, and
the gradients' relative errors against the float64 recurrence, with and without the entry
point's zero padding of small heads (kernels/gated_delta_rule/chunk.py, padded_head_dims).

    python benchmarks/debug_small_heads.py --out DIR        # driver: all cases, parallel
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "kernels"))


def one(case_index: int, dtype_name: str, mode: str):
    import torch
    import test_chunk_bwd as t
    from megatron_gdn.kernels.gated_delta_rule import chunk as ch
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb
    from megatron_gdn.kernels.gated_delta_rule import chunk_fwd as cf

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    case = (t.CASES + EXTRA)[case_index]
    x = t.make_inputs(case)
    expected = t.reference_grads(x, case)
    res = {"case": case.id, "dtype": dtype_name, "mode": mode, "stages": {}}

    def finite(name, *tensors):
        torch.cuda.synchronize()
        res["stages"][name] = all(bool(torch.isfinite(z.float()).all()) for z in tensors if z is not None)

    if mode == "stages":
        # the body of chunk_gated_delta_rule_bwd, one launch at a time
        B, T = case.B, case.T
        cu = torch.tensor(case.cu, dtype=torch.int32, device="cuda") if case.cu else None
        layout = cf.make_chunk_layout(cu, B, T)
        dev = lambda z, dt=dtype: None if z is None else z.to(device="cuda", dtype=dt).contiguous()  # noqa: E731
        q, k, v, do = dev(x["q"]), dev(x["k"]), dev(x["v"]), dev(x["do"])
        gc = t.chunk_cumsum(x["g"], layout).cuda()
        beta = dev(x["beta"], torch.float32)
        g = dev(x["g"], torch.float32)
        h0, dht = dev(x["h0"], torch.float32), dev(x["dht"], torch.float32)
        q_rstd = k_rstd = None
        if case.l2:
            q_rstd = torch.rsqrt(x["q"].pow(2).sum(-1) + 1e-6).float().cuda()
            k_rstd = torch.rsqrt(x["k"].pow(2).sum(-1) + 1e-6).float().cuda()
        H, HV, K, V = case.H, case.HV, case.K, case.V
        scale = K ** -0.5
        tm = torch.full((B, T, HV, 64), float("nan"), dtype=v.dtype, device="cuda")
        w = torch.full((B, T, HV, K), float("nan"), dtype=k.dtype, device="cuda")
        u = torch.full((B, T, HV, V), float("nan"), dtype=v.dtype, device="cuda")
        dv_buf = torch.full((B, T, HV, V), float("nan"), dtype=v.dtype, device="cuda")
        cb.launch_prep(q, k, v, g, gc, beta, q_rstd, k_rstd, do, tm, w, u, dv_buf, scale, layout,
                       False)
        finite("prep", tm, w, u, dv_buf)
        h, v_new, _ = cf.chunk_state_fwd(k, w, u, gc, layout, h0, False, k_rstd=k_rstd)
        finite("state", h, v_new)
        dh = torch.full_like(h, float("nan"))
        dh0 = torch.full_like(h0, float("nan")) if h0 is not None else None
        # as launch_dh runs them, apart so that each launch's output is checked
        inline = cb.qdo_inline(cb._pow2(K), cf._parallelism_class(layout.num_seqs * HV))
        kscale = cb.launch_qdo(q, gc, q_rstd, do, dh, scale, layout, g, k_rstd,
                               store_qdo=not inline)
        finite("key decay" if inline else "qdo", kscale, *(() if inline else (dh,)))
        cb.launch_dh_pass(q, k, w, gc, q_rstd, kscale, do, dv_buf, dht, dh, dh0, scale, layout,
                          inline=inline)
        finite("dh", dh, dv_buf, dh0)
        # the gradient stage as the backward runs it, one program per key head (dq / dk summed
        # over the group inside)
        dq, dk, dv, dg, dbeta = cb.launch_grads(
            q, k, v, g, gc, beta, q_rstd, k_rstd, tm, h, dh, v_new, dv_buf,
            do, scale, layout, HV // H)
        outs = [dq, dk, dv]
        finite("grads", *outs, dg, dbeta)
        got = dict(q=outs[0], k=outs[1], v=outs[2], g=dg, beta=dbeta)
        if h0 is not None:
            got["h0"] = dh0
        for name in ("_bwd_prep_kernel", "_bwd_dh_kernel", "_bwd_grad_vq_kernel",
                     "_bwd_grad_k_kernel"):
            res[name] = str(getattr(getattr(cb, name), "best_config", None))
    else:
        if mode == "unpadded":
            ch.padded_head_dims = lambda K, V: (K, V)
        got = t.run_backward_public(x, case, dtype) if hasattr(t, "run_backward_public") else None
        if got is None:
            got = public_grads(x, case, dtype)
    res["errors"] = {}
    for name, ref in expected.items():
        a = got[name].detach().double().cpu()
        res["errors"][name] = float((a - ref).norm() / ref.norm().clamp_min(1e-30)) \
            if torch.isfinite(a).all() else float("nan")
    return res


def public_grads(x, case, dtype):
    """Gradients through the public entry point (autograd), padding as the entry point does."""
    import torch
    from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule
    leaves = {n: x[n].to("cuda", dtype if n in ("q", "k", "v") else torch.float32).requires_grad_(True)
              for n in ("q", "k", "v", "g", "beta")}
    if x["h0"] is not None:
        leaves["h0"] = x["h0"].to("cuda", torch.float32).requires_grad_(True)
    cu = torch.tensor(case.cu, dtype=torch.int32, device="cuda") if case.cu else None
    o, s = chunk_gated_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"],
                                  None, leaves.get("h0"), True, cu, use_qk_l2norm=case.l2)
    loss = (o.float() * x["do"].to("cuda", torch.float32)).sum()
    if x["dht"] is not None:
        loss = loss + (s * x["dht"].to("cuda", torch.float32)).sum()
    loss.backward()
    return {n: z.grad for n, z in leaves.items()}


def _extra():
    import test_chunk_bwd as t
    return [t.Case(2, 100, 2, 2, 64, 64), t.Case(1, 136, 1, 2, 64, 64, cu=(0, 1, 65, 70, 135, 136)),
            t.Case(1, 130, 2, 4, 64, 64, cu=(0, 64, 65, 130), dht=False, gate="mixed", beta="binary")]


EXTRA = []


def main():
    global EXTRA
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--one", nargs=3, metavar=("CASE", "DTYPE", "MODE"))
    args = p.parse_args()
    EXTRA = _extra()
    if args.one:
        try:
            r = one(int(args.one[0]), args.one[1], args.one[2])
        except Exception as e:  # report, the driver collects
            r = {"case": args.one[0], "dtype": args.one[1], "mode": args.one[2],
                 "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("RESULT " + json.dumps(r), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    import test_chunk_bwd as t
    n = len(t.CASES) + len(EXTRA)
    # fp32 passed at every small case on the GPU; bf16 is the one to localise
    jobs = [(i, "bf16", m) for i in list(range(4)) + list(range(len(t.CASES), n))
            for m in ("stages", "padded")]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", MEGATRON_GDN_AUTOTUNE="0")
    procs = []
    for i, d, m in jobs:
        procs.append(((i, d, m), subprocess.Popen(
            [sys.executable, __file__, "--out", args.out, "--one", str(i), d, m],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
        while sum(pr.poll() is None for _, pr in procs) >= 14:
            import time
            time.sleep(0.2)
    results = []
    for job, pr in procs:
        text, _ = pr.communicate(timeout=600)
        line = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(line[-1][7:]) if line else
                       {"job": job, "error": "no result", "tail": text[-800:]})
        print(json.dumps(results[-1]), flush=True)
    with open(os.path.join(args.out, "debug_small_heads.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
