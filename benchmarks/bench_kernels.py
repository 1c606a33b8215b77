"""Kernel benchmark: the chunked gated delta rule (ours, Triton) next to flash-linear-attention
0.6.0 and causal softmax attention (torch SDPA), in one process, on one GPU.

    python benchmarks/bench_kernels.py --out benchmarks/logs/run --shapes S1,S2,S3 --check

Correctness of what is timed: --check first compares o and every gradient (q, k, v, g, beta,
initial_state) at the benchmark shapes, bf16 and fp32 inputs, against the pure-torch chunked
path in fp32 on the same GPU (ours with the states kept too, at the first shape in bf16;
tests/kernels/test_gated_delta_rule.py and
tests/kernels/test_chunk_internals.py guard the same kernels against the fp64 oracle).
Workload, as the layer calls it: q, k raw with the fused l2-norm, g = logsigmoid(x) (float32),
beta = sigmoid(x) in the inputs' dtype, scale K^-0.5.

fla refuses its Triton backward on Hopper with triton < 3.7.1 (a miscompile in its gated
dq/dk kernel); to time it this script sets fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True.
Also measured: the card's device copy bandwidth and bf16 matmul rate (the two ceilings).
Writes results.json and results.md under --out.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

SHAPES = {
    # id: B, T, H, HV, K, V (DESIGN.md section 7)
    "S1": (4, 4096, 16, 16, 128, 128),
    "S2": (1, 32768, 16, 16, 128, 128),
    "S3": (2, 8192, 16, 32, 128, 128),
    "S4": (4, 4096, 6, 6, 256, 512),
    "S5": (8, 2048, 16, 16, 128, 128),
}
BF16_REL = 1e-2
FP32_REL = 5e-3
T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


def make_inputs(B, T, H, HV, K, V, dtype, seed=0, with_state=False, N=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    q = torch.randn(B, T, H, K, device=dev, generator=gen).to(dtype)
    k = torch.randn(B, T, H, K, device=dev, generator=gen).to(dtype)
    v = torch.randn(B, T, HV, V, device=dev, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, HV, device=dev, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(B, T, HV, device=dev, generator=gen)).to(dtype)
    h0 = None
    if with_state:
        h0 = 0.1 * torch.randn(N or B, HV, K, V, device=dev, generator=gen)
    return q, k, v, g, beta, h0


def ours(q, k, v, g, beta, h0=None, final=False, cu=None, keep_states=None):
    from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g, beta, None, h0, final, cu, use_qk_l2norm=True,
                                  keep_states=keep_states)


# ours with the per-chunk states kept from the forward for the backward
ours_keep = functools.partial(ours, keep_states=True)


def reference(q, k, v, g, beta, h0=None, final=False, cu=None):
    from megatron_gdn.kernels.gated_delta_rule.torch_ref import chunk_gated_delta_rule_torch

    return chunk_gated_delta_rule_torch(q, k, v, g, beta, None, h0, final, cu, use_qk_l2norm=True)


def fla_fn():
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdr

    # fla 0.6.0 refuses its backward on Hopper with triton < 3.7.1: bypass to time it
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True

    def run(q, k, v, g, beta, h0=None, final=False, cu=None):
        return fla_gdr(q, k, v, g, beta, initial_state=h0, output_final_state=final,
                       use_qk_l2norm_in_kernel=True, cu_seqlens=cu)

    return run


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads_of(fn, inputs, do, dht, cu=None):
    q, k, v, g, beta, h0 = inputs
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, beta)]
    h0l = h0.detach().clone().requires_grad_(True) if h0 is not None else None
    o, ht = fn(*leaves, h0l, dht is not None, cu)
    loss = (o.float() * do.float()).sum()
    if dht is not None:
        loss = loss + (ht * dht).sum()
    loss.backward()
    out = {"o": o.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad,
           "dg": leaves[3].grad, "dbeta": leaves[4].grad}
    if dht is not None:
        out["ht"] = ht.detach()
    if h0l is not None:
        out["dh0"] = h0l.grad
    return out


def check(name, fn, shape, dtype, seed, cu=None, with_state=True):
    B, T, H, HV, K, V = shape
    N = B if cu is None else cu.numel() - 1
    inputs = make_inputs(B, T, H, HV, K, V, dtype, seed=seed, with_state=with_state, N=N)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    do = torch.randn(B, T, HV, V, device="cuda", generator=gen).to(dtype)
    dht = torch.randn(N, HV, K, V, device="cuda", generator=gen) if with_state else None
    got = grads_of(fn, inputs, do, dht, cu)
    ref_inputs = [x.float() if x is not None else None for x in inputs]
    ref = grads_of(reference, ref_inputs, do.float(), dht, cu)
    errs = {key: rel(got[key], ref[key]) for key in ref}
    tol = BF16_REL if dtype != torch.float32 else FP32_REL
    finite = all(torch.isfinite(got[key]).all().item() for key in got)
    ok = finite and all(e <= tol for e in errs.values())
    return {"impl": name, "dtype": str(dtype).split(".")[-1], "shape": list(shape),
            "packed": cu is not None, "errors": errs, "tol": tol, "ok": ok}


def bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def timing_inputs(shape, dtype):
    """The timed workload: the five inputs as leaves that take gradients, and the output's
    gradient."""
    B, T, H, HV, K, V = shape
    q, k, v, g, beta, _ = make_inputs(B, T, H, HV, K, V, dtype, seed=7)
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta)]
    return leaves, torch.randn(B, T, HV, V, device="cuda", dtype=dtype)


def time_impl(fn, shape, dtype=torch.bfloat16):
    leaves, do = timing_inputs(shape, dtype)

    def fwd():
        return fn(*leaves)[0]

    def fwd_bwd():
        o = fn(*leaves)[0]
        o.backward(do)

    def zero():
        for x in leaves:
            x.grad = None

    fwd_bwd()
    zero()
    res = {"fwd_ms": bench_ms(fwd)}
    res["fwd_peak_gib"] = peak_gib(fwd)
    res["fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100,
                                                grad_to_none=leaves, return_mode="median")
    zero()
    res["fwd_bwd_peak_gib"] = peak_gib(fwd_bwd)
    return res


def kernel_trace(fn, shape, iters=5, dtype=torch.bfloat16):
    """fwd+bwd under torch.profiler, per kernel: GPU microseconds per call (summed over its
    launches in one fwd+bwd) and launches per call, largest first; with the sum of the kernels'
    time against the wall time per call (the gap is the GPU idle between launches)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    leaves, do = timing_inputs(shape, dtype)

    def fwd_bwd():
        fn(*leaves)[0].backward(do)
        for x in leaves:
            x.grad = None

    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fwd_bwd()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6 / iters
    rows = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        r = rows.setdefault(e.name, [0.0, 0])
        r[0] += e.time_range.elapsed_us() / iters
        r[1] += 1
    kernels = sorted(([n, round(us, 1), c / iters] for n, (us, c) in rows.items()),
                     key=lambda x: -x[1])
    return {"wall_us": round(wall_us, 1), "kernels_us": round(sum(x[1] for x in kernels), 1),
            "kernels": kernels}


def stage_times(shape, dtype=torch.bfloat16):
    """Our forward launch by launch (where the time goes), with the autotuner's picks."""
    from megatron_gdn.kernels.gated_delta_rule import chunk_fwd as cf

    B, T, H, HV, K, V = shape
    q, k, v, g, beta, _ = make_inputs(B, T, H, HV, K, V, dtype, seed=3)
    layout = cf.make_chunk_layout(None, B, T)
    gc, _, k_rstd, w, u = cf.chunk_prepare_fwd(k, v, g, beta, layout, use_qk_l2norm=True)
    h, v_new, _ = cf.chunk_state_fwd(k, w, u, gc, layout, k_rstd=k_rstd)
    res = {
        "prepare_ms": bench_ms(lambda: cf.chunk_prepare_fwd(k, v, g, beta, layout, use_qk_l2norm=True)),
        "state_ms": bench_ms(lambda: cf.chunk_state_fwd(k, w, u, gc, layout, k_rstd=k_rstd)),
        "output_ms": bench_ms(lambda: cf.chunk_output_fwd(q, k, v_new, h, gc, K**-0.5, layout,
                                                           k_rstd=k_rstd, use_qk_l2norm=True)),
    }
    for name in ("_prepare_kernel", "_state_kernel", "_output_kernel"):
        best = getattr(getattr(cf, name), "best_config", None)
        res[name] = str(best)
    return res


def output_pin(spec):
    """BV:num_warps:num_stages[:maxnreg] -> triton.Config for the output kernel (maxnreg 0 or
    absent: no register cap)."""
    bv, warps, stages, *rest = (int(x) for x in spec.split(":"))
    return triton.Config({"BV": bv}, num_warps=warps, num_stages=stages,
                         maxnreg=(rest[0] or None) if rest else None)


def diag_output(shape, pins=()):
    """bf16: o of our output kernel per config (its own, then the `pins`, each also timed), and
    o recomputed in torch from the same h / v_new / gc, each against the fp32 torch path
    (tells the output kernel from upstream)."""
    from megatron_gdn.kernels.gated_delta_rule import chunk_fwd as cf

    B, T, H, HV, K, V = shape
    q, k, v, g, beta, _ = make_inputs(B, T, H, HV, K, V, torch.bfloat16, seed=11)
    ref = reference(q.float(), k.float(), v.float(), g, beta.float())[0]
    layout = cf.make_chunk_layout(None, B, T)
    gc, _, k_rstd, w, u = cf.chunk_prepare_fwd(k, v, g, beta, layout, use_qk_l2norm=True)
    h, v_new, _ = cf.chunk_state_fwd(k, w, u, gc, layout, k_rstd=k_rstd)
    out = {}
    for cfg in list(cf._output_kernel.configs) + [output_pin(p) for p in pins]:
        run = lambda: cf.chunk_output_fwd(q, k, v_new, h, gc, K**-0.5, layout,  # noqa: E731
                                          k_rstd=k_rstd, use_qk_l2norm=True, config=cfg)
        o, _ = run()
        out[str(cfg)] = {"rel_err": rel(o, ref), "ms": bench_ms(run)}
    NT, G = T // 64, HV // H
    qn = F.normalize(q.float(), dim=-1, eps=1e-3).repeat_interleave(G, 2).view(B, NT, 64, HV, K)
    kn = F.normalize(k.float(), dim=-1, eps=1e-3).repeat_interleave(G, 2).view(B, NT, 64, HV, K)
    gcc = gc.view(B, NT, 64, HV)
    hh = h.float().view(B, NT, HV, K, V)
    vn = v_new.float().view(B, NT, 64, HV, V)
    inter = torch.einsum("bnihk,bnhkv->bnihv", qn * gcc.exp()[..., None], hh)
    s = torch.einsum("bnihk,bnjhk->bnhij", qn, kn)
    d = gcc.permute(0, 1, 3, 2)
    s = s * torch.exp((d[..., :, None] - d[..., None, :]).tril()) * torch.ones(64, 64, device="cuda").tril()
    o_t = (inter + torch.einsum("bnhij,bnjhv->bnihv", s, vn)) * K**-0.5
    out["torch_from_h_vnew"] = rel(o_t.reshape(B, T, HV, V), ref)
    return out


def time_sdpa(shape):
    B, T, H, HV, K, V = shape
    q, k, v = (torch.randn(B, HV, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn(B, HV, T, 128, device="cuda", dtype=torch.bfloat16)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        fwd().backward(do)

    res = {"fwd_ms": bench_ms(fwd)}
    res["fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=[q, k, v],
                                                return_mode="median")
    res["fwd_bwd_peak_gib"] = peak_gib(fwd_bwd)
    return res


def ceilings():
    n = 2**28
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    t = bench_ms(lambda: y.copy_(x))
    copy_tbs = 2 * n * 4 / (t * 1e-3) / 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench_ms(lambda: a @ b)
    mm_tflops = 2 * 8192**3 / (t * 1e-3) / 1e12
    del x, y, a, b
    return {"copy_TBps": copy_tbs, "bf16_matmul_TFLOPs": mm_tflops}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for results.json / results.md")
    p.add_argument("--shapes", default="S1,S2,S3")
    p.add_argument("--check", action="store_true", help="correctness at the benchmark shapes first")
    p.add_argument("--check-shapes", default="", help="shapes for --check (default: --shapes)")
    p.add_argument("--check-dtypes", default="bf16,fp32",
                   help="fp32 only at the first shape unless --check-shapes is given")
    p.add_argument("--no-check-packed", action="store_true",
                   help="skip the packed bf16 batch (mixed lengths, HV > H)")
    p.add_argument("--check-fla", action="store_true", help="also fla's errors (autotunes fla)")
    p.add_argument("--diag", action="store_true", help="output-kernel diagnostics in bf16")
    p.add_argument("--output-pins", default="",
                   help="with --diag: output-kernel configs to check and time beside its own, "
                        "BV:warps:stages[:maxnreg] comma-separated")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--bwd-stages", action="store_true",
                   help="also time our backward launch by launch (profile_chunk_bwd.py)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="start no new section after this many seconds")
    p.add_argument("--ab-dh-prefetch", action="store_true",
                   help="also time ours with the reverse state pass's hand prefetch off "
                        "(chunk_bwd.DH_PREFETCH_MAX_K = 0): rows ours[_keep]_no_dh_prefetch")
    p.add_argument("--ab-qdo-inline", action="store_true",
                   help="also time ours with the reverse state pass's source of (scale q e^gc)^T do "
                        "switched (chunk_bwd.QDO_INLINE): rows ours[_keep]_qdo_launch (the "
                        "parallel launch storing it) or ours[_keep]_qdo_inline")
    p.add_argument("--ab-split-group", action="store_true",
                   help="also time ours with the gradient stage looping over a key head's G value "
                        "heads in one program (chunk_bwd.SPLIT_GROUP = False; HV > H only): rows "
                        "ours[_keep]_one_group_program")
    p.add_argument("--trace", default="",
                   help="shapes whose fwd+bwd (ours, ours_keep, fla) to profile kernel by kernel")
    p.add_argument("--keep-states", action="store_true",
                   help="ours keeps its per-chunk states for the backward (MEGATRON_GDN_KEEP_STATES=1)")
    args = p.parse_args()
    if args.keep_states:
        from megatron_gdn.kernels.utils import set_keep_states_default

        set_keep_states_default()
    os.makedirs(args.out, exist_ok=True)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    results = {
        "card": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv), "checks": [], "timings": {},
        "notes": ["fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True set in-process to time fla's backward"],
    }

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    def over_budget():
        return time.time() - T0 > args.budget_s

    results["ceilings"] = ceilings()
    log("ceilings", results["ceilings"])
    save()
    fla = None
    if not args.no_fla:
        try:
            fla = fla_fn()
        except Exception as e:  # fla is optional: report, time ours anyway
            log("fla unavailable:", repr(e))

    if args.diag:
        try:
            pins = [p for p in args.output_pins.split(",") if p]
            results["diag"] = diag_output(SHAPES[shapes[0]], pins)
        except Exception as e:
            results["diag"] = {"error": repr(e)}
            traceback.print_exc()
        log("diag", json.dumps(results["diag"]))
        save()

    if args.check:
        plan = []
        check_shapes = args.check_shapes.split(",") if args.check_shapes else shapes
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
        for dname in args.check_dtypes.split(","):
            # fp32 compiles its own kernels: by default only at the first shape
            for sid in (check_shapes if dname != "fp32" or args.check_shapes else check_shapes[:1]):
                plan.append(("ours", ours, SHAPES[sid], dtypes[dname], None))
        if not args.keep_states and "bf16" in args.check_dtypes.split(","):
            # the backward that reads the forward's states and Tm (no state pass), at the
            # first shape
            plan.append(("ours_keep", ours_keep, SHAPES[check_shapes[0]], torch.bfloat16, None))
        if not args.no_check_packed:
            cu = torch.tensor([0, 1, 64, 100, 2148, 4096, 8000, 8192], dtype=torch.int32,
                              device="cuda")
            plan.append(("ours", ours, (1, 8192, 16, 32, 128, 128), torch.bfloat16, cu))
        if fla is not None and args.check_fla:
            plan.append(("fla", fla, SHAPES[shapes[0]], torch.bfloat16, None))
        for i, (name, fn, shape, dtype, cu_) in enumerate(plan):
            if over_budget():
                log("budget reached, skipping remaining checks")
                break
            try:
                r = check(name, fn, shape, dtype, seed=100 + i, cu=cu_)
            except Exception as e:
                r = {"impl": name, "dtype": str(dtype), "shape": list(shape), "ok": False,
                     "error": "".join(traceback.format_exception_only(type(e), e)).strip()}
                traceback.print_exc()
            log("check", json.dumps(r))
            results["checks"].append(r)
            save()
            torch.cuda.empty_cache()

    for sid in shapes:
        shape = SHAPES[sid]
        row = results["timings"].setdefault(sid, {"shape": list(shape)})

        def timed(name, fn):
            if over_budget():
                return
            try:
                row[name] = time_impl(fn, shape)
            except Exception as e:
                row[name] = {"error": "".join(traceback.format_exception_only(type(e), e)).strip()}
                traceback.print_exc()
            log(sid, name, row[name])
            save()
            torch.cuda.empty_cache()

        # ours and its stage split first, fla last: fla autotunes each new shape for ~100 s,
        # and a budget cut then loses fla's row, not ours
        timed("ours", ours)
        if not args.keep_states:
            # the states kept (more memory, no state pass in the backward), beside the default
            timed("ours_keep", ours_keep)
        from megatron_gdn.kernels.gated_delta_rule import chunk_bwd

        def timed_with(switch, value, suffix, keep=True):
            """ours (and ours_keep, unless not keep) again with chunk_bwd's module switch set
            to value."""
            saved = getattr(chunk_bwd, switch)
            setattr(chunk_bwd, switch, value)
            try:
                timed(f"ours_{suffix}", ours)
                if keep and not args.keep_states:
                    timed(f"ours_keep_{suffix}", ours_keep)
            finally:
                setattr(chunk_bwd, switch, saved)

        if args.ab_dh_prefetch:
            # the same two with the reverse state pass's loads left to Triton (no PREFETCH)
            timed_with("DH_PREFETCH_MAX_K", 0, "no_dh_prefetch")
        if args.ab_qdo_inline:
            on = chunk_bwd.QDO_INLINE
            timed_with("QDO_INLINE", not on, "qdo_launch" if on else "qdo_inline")
        if args.ab_split_group and shape[3] > shape[2]:
            timed_with("SPLIT_GROUP", False, "one_group_program")
        if not over_budget():
            try:
                row["ours_stages"] = stage_times(shape)
            except Exception as e:
                row["ours_stages"] = {"error": repr(e)}
            log(sid, "ours_stages", row["ours_stages"])
        if args.bwd_stages and not over_budget():
            try:
                import profile_chunk_bwd
                row["ours_bwd_stages"] = profile_chunk_bwd.backward_stages(shape)
            except Exception as e:
                row["ours_bwd_stages"] = {"error": repr(e)}
                traceback.print_exc()
            log(sid, "ours_bwd_stages", row["ours_bwd_stages"])
        if fla is not None:
            timed("fla", fla)
        if sid in args.trace.split(","):
            impls = [("ours", ours)] + ([] if args.keep_states else [("ours_keep", ours_keep)])
            for name, fn in impls + ([("fla", fla)] if fla is not None else []):
                if over_budget():
                    break
                try:
                    row.setdefault("trace", {})[name] = kernel_trace(fn, shape)
                except Exception as e:
                    row.setdefault("trace", {})[name] = {"error": repr(e)}
                    traceback.print_exc()
                log(sid, "trace", name, json.dumps(row["trace"][name]))
                save()
        if not over_budget():
            try:
                row["sdpa"] = time_sdpa(shape)
            except Exception as e:
                row["sdpa"] = {"error": repr(e)}
            log(sid, "sdpa", row["sdpa"])
        save()
        torch.cuda.empty_cache()

    lines = [f"card: {results['card']}, torch {results['torch']}, triton {results['triton']}, "
             f"{results['date']}",
             f"ceilings: copy {results['ceilings']['copy_TBps']:.2f} TB/s, bf16 matmul "
             f"{results['ceilings']['bf16_matmul_TFLOPs']:.0f} TFLOP/s", "",
             "| check | dtype | shape | packed | max rel err | ok |", "|---|---|---|---|---|---|"]
    for r in results["checks"]:
        worst = max(r["errors"].items(), key=lambda kv: kv[1]) if r.get("errors") else ("error", math.nan)
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['shape']} | {r.get('packed')} | "
                     f"{worst[0]} {worst[1]:.2e} | {r['ok']} |")
    lines += ["", "| shape | impl | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB |",
              "|---|---|---|---|---|---|"]

    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else "-"

    for sid, row in results["timings"].items():
        # ours as it is, kept states, the A/B rows (ours_*), then the others
        ab = [n for n in row if n.startswith("ours_") and not n.endswith("_stages")
              and n != "ours_keep"]
        for name in ["ours", "ours_keep"] + ab + ["fla", "sdpa"]:
            r = row.get(name)
            if not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"| {sid} | {name} | error: {r['error'][:80]} | | | |")
                continue
            lines.append(f"| {sid} | {name} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} | "
                         f"{fmt(r.get('fwd_peak_gib'))} | {fmt(r.get('fwd_bwd_peak_gib'))} |")
        for name in ("ours", "ours_keep"):
            if name in row and "fla" in row and "fwd_ms" in row[name] and "fwd_ms" in row["fla"]:
                lines.append(f"| {sid} | {name}/fla | {row[name]['fwd_ms'] / row['fla']['fwd_ms']:.2f} | "
                             f"{row[name]['fwd_bwd_ms'] / row['fla']['fwd_bwd_ms']:.2f} | "
                             f"{row[name]['fwd_peak_gib'] / row['fla']['fwd_peak_gib']:.2f} | "
                             f"{row[name]['fwd_bwd_peak_gib'] / row['fla']['fwd_bwd_peak_gib']:.2f} |")
    fwd = {sid: row["ours_stages"] for sid, row in results["timings"].items()
           if "prepare_ms" in row.get("ours_stages", {})}
    if fwd:
        # the forward stage by stage, same run and card
        lines += ["", "| shape | prepare ms | state ms | output ms |", "|---|---|---|---|"]
        for sid, st in fwd.items():
            lines.append(f"| {sid} | {fmt(st['prepare_ms'])} | {fmt(st['state_ms'])} | "
                         f"{fmt(st['output_ms'])} |")
    stages = {sid: row["ours_bwd_stages"] for sid, row in results["timings"].items()
              if "grads_ms" in row.get("ours_bwd_stages", {})}
    if stages:
        # --bwd-stages: the backward launch by launch (profile_chunk_bwd.backward_stages)
        names = ("prep", "prep_saved_tm", "state", "qdo", "dh", "dh_no_prefetch", "dh_qdo_inline",
                 "state_dh", "grads", "bwd_total")
        lines += ["", "| shape | " + " | ".join(f"{n} ms" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for sid, st in stages.items():
            lines.append(f"| {sid} | " + " | ".join(fmt(st.get(n + "_ms")) for n in names) + " |")
    for sid, row in results["timings"].items():
        # --trace: fwd+bwd kernel by kernel (GPU us per call, launches per call)
        for name, tr in row.get("trace", {}).items():
            if "kernels" not in tr:
                continue
            lines += ["", f"{sid} {name}: kernels {tr['kernels_us']:.0f} us of {tr['wall_us']:.0f} "
                      "us wall per fwd+bwd", "", "| kernel | us | launches |", "|---|---|---|"]
            lines += [f"| {n[:90]} | {us:.1f} | {c:g} |" for n, us, c in tr["kernels"]]
    text = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    save()
    print(text, flush=True)


if __name__ == "__main__":
    main()
