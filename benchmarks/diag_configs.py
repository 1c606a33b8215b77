"""Which launch config of which sequential pass breaks a case: every gradient's error against the
float64 chunked torch path, with the reverse state pass (dh) or the forward state pass pinned to
one config at a time, each variant in its own process (an illegal address ends the CUDA context).

    python benchmarks/diag_configs.py --out DIR [--dh 32:8:1,16:8:1] [--state 16:4:3]
    python benchmarks/diag_configs.py --one CASE DH STATE  # one variant (what the driver runs)

CASE: a GPU test case name plus "@dtype" (small), "S2" (B 1, T 32768, 16 heads, K = V = 128) or
"S3" (B 2, T 8192, 16 key / 32 value heads); GRADS pins both gradient launches (BV:warps:stages).
DH / STATE: "auto" (the kernel's own configs) or BV:num_warps:num_stages, pinned (the dh pass
also takes :ROW_SCALE, 1 or 0). The driver
runs every pinned config on S2 and the small cases with MEGATRON_GDN_AUTOTUNE=0, and the
kernels' own lists on S2 with autotuning on.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec, extra=("ROW_SCALE", "maxnreg")):
    """BV:num_warps:num_stages[:X...] -> triton.Config, the trailing fields named by `extra`:
    ROW_SCALE (the dh pass's key decay on the product rows, 1, or on k, 0), BK (the dk launch's
    key-column block) or maxnreg (a register cap, a launch option rather than a kwarg)."""
    import triton

    bv, warps, stages, *rest = map(int, spec.split(":"))
    kwargs = {"BV": bv}
    maxnreg = None
    for name, value in zip(extra, rest):
        if name == "maxnreg":
            maxnreg = value
        else:
            kwargs[name] = bool(value) if name == "ROW_SCALE" else value
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def one(case_name, dh, state, grad_pin="auto"):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch

    import test_gated_delta_rule as t
    from bench_kernels import SHAPES
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd, chunk_fwd
    from megatron_gdn.kernels.gated_delta_rule.torch_ref import chunk_gated_delta_rule_torch
    from megatron_gdn.kernels.utils import force_backend

    for kernels, pick, copies in (((chunk_bwd._bwd_dh_kernel,), dh, 2),
                                  ((chunk_fwd._state_kernel,), state, 2)):
        if pick != "auto":
            # the sequential passes prune: two copies, so that the pruning runs and keeps one
            for kernel in kernels:
                kernel.configs = [_config(pick)] * copies
    if grad_pin != "auto":
        # BV:warps:stages for both gradient launches, [:BK[:maxnreg]] for the dk launch's
        # key-column block (and a register cap; without BK the pruning gives 128); two copies:
        # the dk launch prunes
        vq = _config(grad_pin, extra=())
        vq.kwargs["SPLIT_DQ"] = 0  # dq's product in the first V loop, as the fixed config
        chunk_bwd._bwd_grad_vq_kernel.configs = [vq]
        chunk_bwd._bwd_grad_k_kernel.configs = [_config(grad_pin, extra=("BK", "maxnreg"))] * 2
    cases = {c.id: c for c in t.GPU_CASES + t.CASES + t.REAL_CASES}
    if case_name in ("S2", "S3", "S4"):
        case = t.Case(*SHAPES[case_name], state="inout")
        dtype, ref_dtype = torch.bfloat16, torch.float32
    else:
        name, dt = case_name.rsplit("@", 1)
        case, dtype, ref_dtype = cases[name], getattr(torch, dt), torch.float64
    x64 = t.make_inputs(case, t._seed(case.id, "triton", dtype))
    x = t.cast_inputs(x64, dtype)
    ref_in = {n: v.detach().to(ref_dtype).requires_grad_(True) for n, v in x.items()}
    cu = None if case.cu is None else torch.tensor(case.cu, dtype=torch.int32, device="cuda")
    o_ref, s_ref = t.implementation_forward(ref_in, case, cu, fn=chunk_gated_delta_rule_torch)
    if s_ref is None:
        s_ref = o_ref.new_zeros(0)
    gen = torch.Generator(device="cpu").manual_seed(1)
    w = {"o": torch.randn(o_ref.shape, generator=gen, dtype=torch.float64).cuda(),
         "state": torch.randn(s_ref.shape, generator=gen, dtype=torch.float64).cuda()}
    g_ref = torch.autograd.grad(t.loss_of(o_ref, s_ref, w), list(ref_in.values()))
    del o_ref
    torch.cuda.synchronize()
    start = time.time()
    with force_backend("triton"):
        o, s = t.implementation_forward(x, case, cu)
        grads = torch.autograd.grad(t.loss_of(o, s, w), list(x.values()))
    torch.cuda.synchronize()
    res = {"seconds": round(time.time() - start, 1)}
    for n, a, b in zip(x.keys(), grads, g_ref):
        a, b = a.double(), b.double()
        res["d" + n] = round(((a - b).norm() / b.norm().clamp_min(1e-30)).item(), 5)
        if n == "g":  # a bias in dg shows in its sum (dA_log / ddt_bias are sums over tokens)
            res["dg_sum_err_over_norm"] = round(((a - b).sum() / b.norm()).item(), 4)
    if case_name in ("S2", "S3", "S4"):  # fwd+bwd time with these configs (CUDA events, median of 10)
        times = []
        for _ in range(12):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            with force_backend("triton"):
                o, s = t.implementation_forward(x, case, cu)
                torch.autograd.grad(t.loss_of(o, s, w), list(x.values()))
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        res["fwd_bwd_ms_median"] = round(sorted(times[2:])[len(times[2:]) // 2], 3)
    for name, k in (("dh", chunk_bwd._bwd_dh_kernel), ("state", chunk_fwd._state_kernel),
                    ("grad_vq", chunk_bwd._bwd_grad_vq_kernel), ("grad_k", chunk_bwd._bwd_grad_k_kernel)):
        res[name + "_config"] = str(getattr(k, "best_config", None))
    return res


VARIANTS_SMALL = [
    "B2-T37-H1-HV2-K16-V16-state_in@bfloat16",
    "B2-T64-H1-HV2-K32-V16-state_inout@bfloat16",
    "B1-T1000-H2-HV4-K128-V64-cu0_1_130_400_401_1000-state_inout-l2norm-A_log+dt_bias-sigmoid@float32",
    "B1-T1000-H2-HV4-K128-V64-cu0_1_130_400_401_1000-state_inout-l2norm-A_log+dt_bias-sigmoid@bfloat16",
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--one", nargs="+", help="CASE DH STATE [GRADS]")
    p.add_argument("--dh", default="16:4:2:0,16:4:1:0,64:8:1:1,32:8:1:1",
                   help="dh pass configs to pin, BV:warps:stages:ROW_SCALE, comma-separated")
    p.add_argument("--state", default="", help="forward state pass configs to pin, likewise")
    p.add_argument("--grads", default="64:8:1:128,64:8:1:64,64:8:1:64:128,64:4:2:128",
                   help="gradient-launch configs BV:warps:stages[:BK[:maxnreg]] (BK, maxnreg: "
                        "the dk launch's key-column block and register cap) timed on "
                        "--grads-shape next to their own autotuned list")
    p.add_argument("--grads-shape", default="S3", choices=["S2", "S3", "S4"])
    p.add_argument("--only-grads", action="store_true",
                   help="only the --grads-shape jobs (autotuned, then each --grads pin)")
    p.add_argument("--ptxas", default=os.environ.get("MEGATRON_GDN_NEW_PTXAS"),
                   help="another ptxas (TRITON_PTXAS_PATH) for the --ptxas-pins runs")
    p.add_argument("--ptxas-pins", default="16:4:1:1,32:4:1:1",
                   help="dh configs run again with --ptxas: Triton 3.6 ships ptxas 12.8.93, "
                        "which fla PR 1262 found to generate invalid shared-memory addresses")
    args = p.parse_args()
    if args.one:
        try:
            res = one(*args.one)
        except Exception as e:  # noqa: BLE001 (the driver tabulates whatever broke)
            res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return
    import torch

    ngpu = torch.cuda.device_count()
    if ngpu == 0:
        raise SystemExit("diag_configs.py needs a GPU (each variant runs the compiled kernels)")
    jobs = [] if args.only_grads else [("S2", "auto", "auto", "1")]
    pins = [] if args.only_grads else [(c, "auto") for c in args.dh.split(",") if c] + \
           [("auto", c) for c in args.state.split(",") if c]
    for dh, state in pins:
        for case in ["S2"] + VARIANTS_SMALL:
            jobs.append((case, dh, state, "0"))
    if args.ptxas and not args.only_grads:
        for dh in [c for c in args.ptxas_pins.split(",") if c]:
            for case in ["S2"] + VARIANTS_SMALL:
                jobs.append((case, dh, "auto", "0", args.ptxas))
    # last (the least urgent): S3 with every launch autotuned as in training, then with the
    # gradient launches pinned to each candidate (the others still autotuned)
    jobs.append((args.grads_shape, "auto", "auto", "1"))
    for grads in [c for c in args.grads.split(",") if c]:
        jobs.append((args.grads_shape, "auto", "auto", "1", None, grads))
    os.makedirs(args.out, exist_ok=True)
    running, results = [], []
    queue = list(jobs)
    free = list(range(ngpu))
    while queue or running:
        while queue and free:
            case, dh, state, autotune, *extra = queue.pop(0)
            ptxas = [extra[0]] if extra and extra[0] else []
            grads = extra[1] if len(extra) > 1 else "auto"
            gpu = free.pop(0)
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), MEGATRON_GDN_AUTOTUNE=autotune,
                       CUDA_LAUNCH_BLOCKING="1", TRITON_PRINT_AUTOTUNING="1")
            if ptxas:  # its own cache: compiled kernels must not be shared across assemblers
                env.update(TRITON_PTXAS_PATH=ptxas[0], TRITON_CACHE_DIR=f"/tmp/diag_triton_{gpu}_ptxas")
            log = open(os.path.join(args.out, f"job{len(results) + len(running)}.log"), "w")
            proc = subprocess.Popen([sys.executable, __file__, "--one", case, dh, state, grads],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, gpu, (case, dh, state, autotune, ptxas[0] if ptxas else "bundled",
                                        grads), log))
        time.sleep(0.5)
        for item in list(running):
            proc, gpu, key, log = item
            try:
                proc.wait(timeout=0.01)
            except subprocess.TimeoutExpired:
                if time.time() - os.path.getmtime(log.name) > 180:
                    proc.kill()
                continue
            running.remove(item)
            free.append(gpu)
            log.close()
            text = open(log.name).read()
            line = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"crash": text[-600:]}
            results.append({"case": key[0], "dh": key[1], "state": key[2], "autotune": key[3],
                            "ptxas": key[4], "grads": key[5], **res})
            print(json.dumps(results[-1]), flush=True)
            # after every result: a time limit on the driver keeps what finished
            json.dump(results, open(os.path.join(args.out, "diag.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
