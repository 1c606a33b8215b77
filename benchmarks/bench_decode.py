"""Decoding step of the gated delta rule: how close the recurrent kernel gets to streaming the
state at the card's copy bandwidth, next to flash-linear-attention 0.6.0 in the same process.

    python benchmarks/bench_decode.py --out benchmarks/logs/decode

A decode step (T = 1) reads the [N, HV, K, V] fp32 state and writes it back; everything else
is a few hundred bytes per head. So the floor is 2 * N*HV*K*V*4 bytes over the card's
device-to-device copy bandwidth, measured here first (bytes read + written).

Correctness guarded by tests/kernels/test_recurrent.py (CPU, interpreter) and, before any
timing, by a check here at the timed shapes on the GPU: Triton kernel vs the torch path vs the
fp64 naive recurrence (and fla vs the same oracle).

Timing: each step is captured in a CUDA graph (replays of many steps over rotating state
buffers, larger together than L2, so no step finds its state in cache); median over replays,
per step. "eager" adds the Python launch path (argument checks) as a user sees it without graphs.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys

if "--smoke" in sys.argv:
    # the Triton kernels on CPU: the interpreter must be chosen before they are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tolerance import BF16_REL, FP32_REL, TF32_REL, assert_close  # noqa: E402

from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule  # noqa: E402
from megatron_gdn.kernels.gated_delta_rule.recurrent import (  # noqa: E402
    _default_config,
    _fused_recurrent_triton,
    fused_recurrent_gated_delta_rule,
)
from megatron_gdn.kernels.utils import force_backend  # noqa: E402

# (name, B, H, HV, K, V): the shape family and the 1.3B-style 6 heads of 256 x 512
SHAPES = [
    ("h16-k128", 1, 16, 16, 128, 128),
    ("h16-k128", 16, 16, 16, 128, 128),
    ("h16-k128", 64, 16, 16, 128, 128),
    ("h6-k256-v512", 1, 6, 6, 256, 512),
    ("h6-k256-v512", 16, 6, 6, 256, 512),
    ("h6-k256-v512", 64, 6, 6, 256, 512),
]
SWEEP_SHAPES = [("h16-k128", 64, 16, 16, 128, 128), ("h6-k256-v512", 64, 6, 6, 256, 512)]
SWEEP_BV = [8, 16, 32, 64]
SWEEP_WARPS = [1, 2, 4, 8]


def log(msg, fh):
    print(msg, flush=True)
    fh.write(msg + "\n")
    fh.flush()


def make_step(B, H, HV, K, V, device, dtype=torch.bfloat16, seed=0, T=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen) + 2.0)
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen) * 0.1
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype))] + [g.to(device), beta.to(device), h0.to(device)]


def oracle(q, k, v, g, beta, h0, cu_seqlens=None):
    d = torch.float64
    qn, kn = F.normalize(q.to(d), dim=-1, eps=0.0), F.normalize(k.to(d), dim=-1, eps=0.0)
    # the kernels' l2norm is x * rsqrt(|x|^2 + 1e-6): same to ~1e-8 for these |x| ~ sqrt(K)
    return naive_recurrent_gated_delta_rule(qn, kn, v.to(d), g.to(d), beta.to(d), None, h0.to(d), True, cu_seqlens)


def load_fla():
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fn
    except Exception as exc:  # fla is optional: the comparison column is left empty
        return None, f"{type(exc).__name__}: {exc}"
    return fla_fn, None


def check_shape(name, B, H, HV, K, V, device, fla_fn, fh, failures, dtype=torch.bfloat16):
    q, k, v, g, beta, h0 = make_step(B, H, HV, K, V, device, dtype, seed=1)
    ref_o, ref_ht = oracle(q, k, v, g, beta, h0)
    results = {}
    with force_backend("triton"):
        results["triton"] = fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True, use_qk_l2norm=True)
    with force_backend("torch"):
        results["torch"] = fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True, use_qk_l2norm=True)
    state = h0.clone()
    with force_backend("triton"):
        o_in, ht_in = fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, state, use_qk_l2norm=True,
                                                       inplace_state=True)
    if fla_fn is not None:
        results["fla"] = fla_fn(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                                use_qk_l2norm_in_kernel=True)
    checks = [
        # bf16 output: rounding of o dominates; the fp32 state should agree with fp32 rounding
        ("triton o vs fp64", results["triton"][0], ref_o, BF16_REL),
        ("triton state vs fp64", results["triton"][1], ref_ht, FP32_REL),
        ("triton o vs torch path", results["triton"][0], results["torch"][0], BF16_REL),
        ("triton state vs torch path", results["triton"][1], results["torch"][1], FP32_REL),
        ("in-place o vs out-of-place", o_in, results["triton"][0], FP32_REL),
        ("in-place state vs out-of-place", ht_in, results["triton"][1], FP32_REL),
    ]
    if "fla" in results:
        # fla rounds differently (and its own dots may be tf32): the looser fp32 matrix-unit bound
        checks.append(("fla o vs fp64", results["fla"][0], ref_o, BF16_REL))
        checks.append(("fla state vs fp64", results["fla"][1], ref_ht, TF32_REL))
    for label, a, e, tol in checks:
        try:
            err = assert_close(a, e, tol, f"{name} B{B} {label}")
            log(f"  ok   {name} B{B} {label}: rel {err:.2e} (tol {tol:.0e})", fh)
        except AssertionError as exc:
            failures.append(str(exc))
            log(f"  FAIL {exc}", fh)
    if ht_in is not state:
        failures.append(f"{name} B{B}: inplace_state did not return the given tensor")


def check_extras(device, fh, failures, dtype=torch.bfloat16, head_dim=128):
    """GPU checks of what the timed shapes do not touch: packed sequences, GVA, gate params."""
    H, HV, K, V = 4, 8, head_dim, head_dim
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32, device=device)
    q, k, v, g, beta, _ = make_step(1, H, HV, K, V, device, dtype, seed=2, T=9)
    h0 = torch.randn(4, HV, K, V, device=device) * 0.1
    ref_o, ref_ht = oracle(q, k, v, g, beta, h0, cu)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True, cu, use_qk_l2norm=True)
    a = torch.randn(1, 9, HV, device=device)
    A_log, dt_bias = torch.randn(HV, device=device) - 1, torch.randn(HV, device=device)
    gg = -torch.exp(A_log.double()) * F.softplus(a.double() + dt_bias.double())
    b = torch.randn(1, 9, HV, device=device)
    ref_o2, ref_ht2 = oracle(q, k, v, gg, torch.sigmoid(b.double()), h0, cu)
    o2, ht2 = fused_recurrent_gated_delta_rule(q, k, v, a, b, None, h0, True, cu, use_qk_l2norm=True,
                                               A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True)
    for label, x, e, tol in [
        ("packed+GVA o", o, ref_o, BF16_REL), ("packed+GVA state", ht, ref_ht, FP32_REL),
        ("packed+GVA+gate o", o2, ref_o2, BF16_REL), ("packed+GVA+gate state", ht2, ref_ht2, FP32_REL),
    ]:
        try:
            err = assert_close(x, e, tol, label)
            log(f"  ok   {label}: rel {err:.2e} (tol {tol:.0e})", fh)
        except AssertionError as exc:
            failures.append(str(exc))
            log(f"  FAIL {exc}", fh)


def copy_bandwidth(fh, label):
    """Device-to-device copy (bytes read + written) at two sizes; the best is the ceiling.
    On the H200 of benchmarks/RESULTS.md the 1 GiB `copy_` moved only 2.7 TB/s, at the start
    and at the end of the run alike, while 256 MiB moved 4.15 TB/s: one size alone can
    understate the card. The ~1 s of copies first lets an idle card raise its clocks."""
    best = 0.0
    for n in (1 << 26, 1 << 28):  # 256 MiB and 1 GiB of fp32 each way
        src = torch.randn(n, device="cuda")
        dst = torch.empty_like(src)
        if label == "start" and n == 1 << 26:
            for _ in range(400):
                dst.copy_(src)
            torch.cuda.synchronize()
        ms = time_graph(lambda i: dst.copy_(src), 1, steps=8)
        bw = 2 * n * 4 / (ms * 1e-3) / 1e12
        log(f"device copy ({label}) {n * 4 / 2**20:.0f} MiB: {ms * 1e3:.1f} us -> {bw:.2f} TB/s (read + write)", fh)
        best = max(best, bw)
        del src, dst
    torch.cuda.empty_cache()
    return best


def time_graph(step, n_bufs, steps=None, replays=30):
    """ms per step: `steps` calls of step(i % n_bufs) captured in one CUDA graph, median of
    replay times / steps."""
    steps = steps or max(16, n_bufs)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            step(i % n_bufs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(steps):
            step(i % n_bufs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    del graph
    return statistics.median(times)


def time_eager(step, n_bufs, iters=200):
    for i in range(5):
        step(i % n_bufs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        step(i % n_bufs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def state_buffers(B, HV, K, V, l2_bytes):
    """Enough state copies that one pass over them is ~4x L2: every step misses the cache."""
    nbytes = B * HV * K * V * 4
    n = max(2, min(256, math.ceil(4 * l2_bytes / nbytes)))
    return [torch.randn(B, HV, K, V, device="cuda") * 0.1 for _ in range(n)]


def bench_shape(name, B, H, HV, K, V, fla_fn, copy_bw, l2_bytes, fh):
    q, k, v, g, beta, _ = make_step(B, H, HV, K, V, "cuda", seed=3)
    bufs = state_buffers(B, HV, K, V, l2_bytes)
    state_bytes = 2 * B * HV * K * V * 4
    floor_us = state_bytes / (copy_bw * 1e12) * 1e6

    def ours_inplace(i):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, bufs[i], use_qk_l2norm=True, inplace_state=True)

    def ours_new(i):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, bufs[i], True, use_qk_l2norm=True)

    variants = [("ours in-place", ours_inplace), ("ours new state", ours_new)]
    if fla_fn is not None:
        def fla_step(i):
            fla_fn(q, k, v, g=g, beta=beta, initial_state=bufs[i], output_final_state=True,
                   use_qk_l2norm_in_kernel=True)
        variants.append(("fla 0.6.0", fla_step))
    rows = []
    for label, fn in variants:
        try:
            ms = time_graph(fn, len(bufs))
            mode = "graph"
        except Exception as exc:  # graph capture unsupported by a wrapper: fall back to eager timing
            log(f"  {label}: graph capture failed ({type(exc).__name__}: {exc}); eager timing", fh)
            ms = time_eager(fn, len(bufs))
            mode = "eager"
        eager_ms = time_eager(fn, len(bufs))
        bw = state_bytes / (ms * 1e-3) / 1e12
        row = dict(shape=name, B=B, H=H, HV=HV, K=K, V=V, impl=label, timing=mode, us=ms * 1e3,
                   eager_us=eager_ms * 1e3, state_TBps=bw, frac_copy=bw / copy_bw, floor_us=floor_us,
                   config=_default_config(B * HV, K, V) if label.startswith("ours") else None)
        rows.append(row)
        log(f"  {name:13s} B{B:<3d} {label:15s} {ms * 1e3:8.1f} us ({mode}; eager {eager_ms * 1e3:7.1f} us) "
            f"state {bw:5.2f} TB/s = {100 * bw / copy_bw:5.1f}% of copy (floor {floor_us:.1f} us)", fh)
    del bufs
    torch.cuda.empty_cache()
    return rows


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def sweep_shape(name, B, H, HV, K, V, copy_bw, l2_bytes, fh):
    q, k, v, g, beta, _ = make_step(B, H, HV, K, V, "cuda", seed=4)
    bufs = state_buffers(B, HV, K, V, l2_bytes)
    state_bytes = 2 * B * HV * K * V * 4
    scale = K ** -0.5
    rows = []
    for bv in SWEEP_BV:
        for warps in SWEEP_WARPS:
            # past ~128 fp32 state values per thread the tile spills: not worth compiling
            if bv > V or triton_next_pow2(K) * bv > 128 * 32 * warps:
                continue

            def step(i):
                _fused_recurrent_triton(q, k, v, g, beta, scale, bufs[i], bufs[i], None, B,
                                        True, None, None, False, block_v=bv, num_warps=warps)
            try:
                ms = time_graph(step, len(bufs))
            except Exception as exc:  # e.g. out of registers / resources for this tile
                log(f"  sweep {name} BV={bv} warps={warps}: {type(exc).__name__}: {exc}", fh)
                continue
            bw = state_bytes / (ms * 1e-3) / 1e12
            rows.append(dict(shape=name, B=B, BV=bv, num_warps=warps, us=ms * 1e3, frac_copy=bw / copy_bw))
            log(f"  sweep {name} B{B} BV={bv:3d} warps={warps}: {ms * 1e3:7.1f} us, {100 * bw / copy_bw:5.1f}% of copy", fh)
    del bufs
    torch.cuda.empty_cache()
    best = min(rows, key=lambda r: r["us"]) if rows else None
    if best:
        log(f"  best {name} B{B}: BV={best['BV']} warps={best['num_warps']} {best['us']:.1f} us; "
            f"default {_default_config(B * HV, K, V)}", fh)
    return rows


def smoke(fh):
    """CPU (Triton interpreter) run of the correctness section at small shapes."""
    failures = []
    fla_fn, why = load_fla()
    log(f"fla: {'loaded' if fla_fn else why}", fh)
    with force_backend("triton"):
        check_shape("smoke", 2, 2, 4, 32, 32, "cpu", fla_fn, fh, failures, dtype=torch.float32)
        check_extras("cpu", fh, failures, dtype=torch.float32, head_dim=32)
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the log and the JSON results")
    parser.add_argument("--no-sweep", action="store_true", help="skip the BV x num_warps sweep")
    parser.add_argument("--smoke", action="store_true", help="CPU: only the correctness checks, small shapes")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "bench_decode.log"), "w")
    log(f"bench_decode {datetime.datetime.now().isoformat(timespec='seconds')} "
        f"torch {torch.__version__} triton {__import__('triton').__version__}", fh)
    if args.smoke:
        failures = smoke(fh)
        log(f"smoke: {len(failures)} failures", fh)
        sys.exit(1 if failures else 0)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode needs a CUDA device (use --smoke on CPU)")
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    log(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes / 2**20:.0f} MiB", fh)
    fla_fn, why = load_fla()
    log(f"fla: {'fla 0.6.0 fused_recurrent_gated_delta_rule' if fla_fn else why}", fh)

    copy_bw = copy_bandwidth(fh, "start")
    log("correctness (bf16 q/k/v, fp32 state, use_qk_l2norm, T=1):", fh)
    failures = []
    for shape in SHAPES:
        check_shape(*shape, "cuda", fla_fn, fh, failures)
    check_extras("cuda", fh, failures)

    log("decode step timing (T=1, bf16 q/k/v, fp32 state, use_qk_l2norm):", fh)
    rows = []
    for shape in SHAPES:
        rows += bench_shape(*shape, fla_fn, copy_bw, l2_bytes, fh)
    sweep = []
    if not args.no_sweep:
        log("BV x num_warps sweep (in-place, launcher only):", fh)
        for shape in SWEEP_SHAPES:
            sweep += sweep_shape(*shape, copy_bw, l2_bytes, fh)

    copy_end = copy_bandwidth(fh, "end")
    if copy_end > copy_bw:
        log(f"copy bandwidth at the end ({copy_end:.2f} TB/s) beat the start ({copy_bw:.2f}): fractions use the end", fh)
        copy_end_ratio = copy_bw / copy_end
        copy_bw = copy_end
        for r in sweep:
            r["frac_copy"] *= copy_end_ratio
        for r in rows:
            r["frac_copy"] = r["state_TBps"] / copy_bw
            r["floor_us"] = 2 * r["B"] * r["HV"] * r["K"] * r["V"] * 4 / (copy_bw * 1e12) * 1e6

    log("", fh)
    log(f"| shape | B | impl | us / step | state TB/s | % of copy ({copy_bw:.2f} TB/s) | floor us |", fh)
    log("|---|---|---|---|---|---|---|", fh)
    for r in rows:
        log(f"| {r['shape']} | {r['B']} | {r['impl']} | {r['us']:.1f} | {r['state_TBps']:.2f} | "
            f"{100 * r['frac_copy']:.0f}% | {r['floor_us']:.1f} |", fh)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as out:
        json.dump(dict(device=props.name, copy_TBps=copy_bw, rows=rows, sweep=sweep, failures=failures), out, indent=1)
    log(f"correctness failures: {len(failures)}", fh)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
