"""SSD (Mamba2's chunked scalar-decay scan) benchmark: our kernel against mamba_ssm's Triton
`mamba_chunk_scan_combined` in the same run, forward and forward+backward, bf16, one GPU.

    python benchmarks/bench_ssd.py --out benchmarks/logs/ssd

Shape: the Mamba2 1.3B layer, 64 heads of 64, state 128, 1 group; B x T = 4 x 4096 and
1 x 16384 (--shapes to change). What is timed, both sides from the same inputs
x [B, T, 64, 64], dt [B, T, 64] (> 0), A [64] (< 0), B, C [B, T, 1, 128]:
  ours:  g = dt * A (the mixer's elementwise op), then chunk_scalar_decay(C, B, x, g,
         v_scale=dt) (megatron_gdn.kernels.ssd, chunk 64: v = x * dt formed inside the kernels,
         as the mixer calls it; --ab-fused-dt adds a row with the product formed in torch);
  mamba: mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size) for chunk sizes 64, 128, 256
         (Mamba2 models use 256, Megatron's MambaMixer 128); the fastest is the reference.
fwd+bwd: the forward then backward of sum(y * dy), gradients for x, dt, A, B, C.
Median of triton.testing.do_bench. The ratio ours / best mamba must be <= 1.00 (issue 7).

Correctness first (T = 1024, B = 1, same layer shape): both bf16 implementations against our
pure-torch chunked path in fp32 (relative RMS of y and of the gradients of x, dt, B, C; the
bf16 tolerance 1e-2). The kernel's full test suite is tests/kernels/test_ssd.py.

Without mamba_ssm importable (pip install it with MAMBA_SKIP_CUDA_BUILD=TRUE: its Triton SSD
needs no CUDA extension; einops and packaging are its only imports on this path), only our
timings are written. Writes results.json and results.md.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_ssd  # noqa: E402

HEADS, HEADDIM, STATE, GROUPS = 64, 64, 128, 1
BF16_REL = 1e-2


def _mamba():
    """mamba_chunk_scan_combined, or None and the reason. mamba_ssm's package __init__ imports
    its CUDA extension (absent when built with MAMBA_SKIP_CUDA_BUILD=TRUE), so the package is
    registered as a bare namespace first and only the pure-Triton submodule is imported."""
    import importlib.util
    import types

    try:
        if "mamba_ssm" not in sys.modules:
            spec = importlib.util.find_spec("mamba_ssm")
            if spec is None:
                return None, "mamba_ssm is not installed"
            package = types.ModuleType("mamba_ssm")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["mamba_ssm"] = package
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined, None
    except Exception as exc:  # ImportError, or the package failing on import
        return None, f"{type(exc).__name__}: {exc}"


def make_inputs(B, T, dtype=torch.bfloat16, device="cuda", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, HEADS, HEADDIM, device=device, generator=gen).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(B, T, HEADS, device=device, generator=gen) - 3.0)
    A = -torch.exp(torch.rand(HEADS, device=device, generator=gen) * 2.7)   # A in [-16, -1]
    Bm = torch.randn(B, T, GROUPS, STATE, device=device, generator=gen).to(dtype) / STATE ** 0.5
    Cm = torch.randn(B, T, GROUPS, STATE, device=device, generator=gen).to(dtype) / STATE ** 0.5
    return x, dt, A, Bm, Cm


def ours(x, dt, A, Bm, Cm, heads=None, overlap=True, fused_dt=True, bwd_stages=None):
    """chunk_scalar_decay on the mixer's v = x dt, g = dt A. heads: up to this many value heads
    per program of the output launch and the chunk backward (kernels/ssd/chunk.py
    MAX_HEADS_PER_PROGRAM; None: the default); overlap: the backward's state pass again on a
    side stream (OVERLAP_STREAMS). Both are set before the forward and left so: the backward
    reads them, and every timed or checked call is a forward then its backward. fused_dt:
    x * dt inside the kernels (v_scale, as the mixer calls it), else formed in torch first.
    bwd_stages: the chunk backward's pipelining stages (CHUNK_BWD_STAGES; None: the default)."""
    from megatron_gdn.kernels.ssd import chunk_scalar_decay

    profile_ssd.set_switches(heads, overlap, bwd_stages)
    g = dt * A
    if fused_dt:
        return chunk_scalar_decay(Cm, Bm, x, g, 1.0, v_scale=dt)[0]
    v = (x.float() * dt.unsqueeze(-1)).to(x.dtype)
    return chunk_scalar_decay(Cm, Bm, v, g, 1.0)[0]


def ours_heads(n):
    return lambda *args: ours(*args, heads=n)


def ours_in_line(*args):
    return ours(*args, overlap=False)


def ours_unfused_dt(*args):
    return ours(*args, fused_dt=False)


def ours_bwd_stages1(*args):
    return ours(*args, bwd_stages=1)


def ours_torch_fp32(x, dt, A, Bm, Cm):
    from megatron_gdn.kernels.ssd.torch_ref import chunk_scalar_decay_torch

    v = x.float() * dt.unsqueeze(-1)
    return chunk_scalar_decay_torch(Cm.float(), Bm.float(), v, dt * A, 1.0)[0]


def mamba_fn(chunk):
    scan, _ = _mamba()

    def run(x, dt, A, Bm, Cm):
        return scan(x, dt, A, Bm, Cm, chunk_size=chunk)
    return run


def _leaves(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


def _fwd_bwd(fn, inputs, dy):
    leaves = _leaves(inputs)
    y = fn(*leaves)
    y.backward(dy)
    return y, [t.grad for t in leaves]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check(impls):
    x, dt, A, Bm, Cm = make_inputs(1, 1024, seed=1)
    dy = torch.randn(1, 1024, HEADS, HEADDIM, device="cuda")
    y_ref, g_ref = _fwd_bwd(ours_torch_fp32, (x, dt, A, Bm, Cm), dy)
    out = {}
    for name, fn in impls.items():
        y, grads = _fwd_bwd(fn, (x, dt, A, Bm, Cm), dy.to(torch.bfloat16))
        errs = {"y": rel(y, y_ref)}
        for key, a, b in zip(("dx", "ddt", "dA", "dB", "dC"), grads, g_ref):
            errs[key] = rel(a, b)
        errs["ok"] = all(v <= BF16_REL for k, v in errs.items() if k in ("y", "dx", "ddt", "dB", "dC"))
        out[name] = errs
        # the first call of each implementation compiles and autotunes (mamba_ssm's kernels
        # for each chunk size): a line per implementation shows where the time goes
        print("check", name, json.dumps(errs), flush=True)
    return out


def bench(fn, inputs, backward):
    import triton

    leaves = _leaves(inputs) if backward else list(inputs)
    dy = torch.randn_like(fn(*leaves)) if backward else None

    def step():
        y = fn(*leaves)
        if backward:
            y.backward(dy)
    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def trace(fn, inputs, path, title, steps=5):
    """Kernel by kernel CUDA time of `steps` forward+backward calls (torch profiler, after a
    warm-up call), written to path and returned as text."""
    leaves = _leaves(inputs)
    dy = torch.randn_like(fn(*leaves))

    def step():
        fn(*leaves).backward(dy)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    text = (f"{title}: {steps} forward+backward calls, {torch.cuda.get_device_name()}\n"
            + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    with open(path, "w") as f:
        f.write(text + "\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for results.json / results.md")
    ap.add_argument("--shapes", default="4x4096,1x16384", help="comma-separated BxT")
    ap.add_argument("--heads-per-program", default="",
                    help="also time ours with up to these many value heads per program of the "
                         "output and chunk-backward launches, e.g. 1 (comma-separated)")
    ap.add_argument("--ab-overlap", action="store_true",
                    help="also time ours with the backward's two state passes one after the other "
                         "(row ours_in_line; ours runs them on two streams)")
    ap.add_argument("--ab-fused-dt", action="store_true",
                    help="also time ours with v = x * dt formed in torch before the kernel (ours_unfused_dt)")
    ap.add_argument("--ab-bwd-stages", action="store_true",
                    help="also time ours with the chunk backward at one pipelining stage (ours_bwd_stages1)")
    ap.add_argument("--mamba-chunks", default="64,128,256",
                    help="chunk sizes of mamba_chunk_scan_combined to time; the fastest is the reference")
    ap.add_argument("--trace", action="store_true",
                    help="also profile one forward+backward of ours and of the fastest mamba chunk size "
                         "kernel by kernel (torch profiler; trace_<shape>_<impl>.txt)")
    ap.add_argument("--stages", action="store_true",
                    help="also time our kernel launch by launch (benchmarks/profile_ssd.py)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ssd.py needs a GPU")
    os.makedirs(args.out, exist_ok=True)
    scan, why = _mamba()
    impls = {"ours": ours}
    for n in (int(c) for c in args.heads_per_program.split(",") if c):
        impls[f"ours_heads{n}"] = ours_heads(n)
    if args.ab_overlap:
        impls["ours_in_line"] = ours_in_line
    if args.ab_fused_dt:
        impls["ours_unfused_dt"] = ours_unfused_dt
    if args.ab_bwd_stages:
        impls["ours_bwd_stages1"] = ours_bwd_stages1
    if scan is not None:
        for chunk in (int(c) for c in args.mamba_chunks.split(",")):
            impls[f"mamba_chunk{chunk}"] = mamba_fn(chunk)
    res = {"device": torch.cuda.get_device_name(), "mamba_ssm": why or "importable",
           "check": check(impls), "timings_ms": {}}
    print(json.dumps(res["check"], indent=1))
    for shape in args.shapes.split(","):
        B, T = (int(s) for s in shape.split("x"))
        inputs = make_inputs(B, T)
        row = {}
        for name, fn in impls.items():
            row[name] = {"fwd": bench(fn, inputs, False), "fwd_bwd": bench(fn, inputs, True)}
            print(shape, name, row[name], flush=True)
        mambas = [k for k in row if k.startswith("mamba")]
        if mambas:
            for mode in ("fwd", "fwd_bwd"):
                best = min(mambas, key=lambda k: row[k][mode])
                row[f"ratio_{mode}"] = {"vs": best, "ours_over_mamba": row["ours"][mode] / row[best][mode]}
        res["timings_ms"][shape] = row
        if args.trace:
            names = ["ours"] + ([min(mambas, key=lambda k: row[k]["fwd_bwd"])] if mambas else [])
            for name in names:
                print(trace(impls[name], inputs, os.path.join(args.out, f"trace_{shape}_{name}.txt"),
                            f"{name} {shape}"), flush=True)
        if args.stages:
            # the launches at the defaults (ssd_stages sets them; the rows above leave the last
            # variant's switches)
            row["ours_stages"] = profile_ssd.ssd_stages(B, T, HEADS, HEADDIM, STATE, GROUPS)
            print(shape, "ours_stages", json.dumps(row["ours_stages"]), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# SSD benchmark ({res['device']}, bf16, {HEADS} heads x {HEADDIM}, state {STATE})", "",
             f"mamba_ssm: {res['mamba_ssm']}", "", "## Check vs fp32 torch path (T=1024)", "",
             "| impl | y | dx | ddt | dA | dB | dC | ok |", "|---|---|---|---|---|---|---|---|"]
    for name, e in res["check"].items():
        lines.append(f"| {name} | " + " | ".join(f"{e[k]:.2e}" for k in ("y", "dx", "ddt", "dA", "dB", "dC"))
                     + f" | {e['ok']} |")
    lines += ["", "## Timings (ms, median)", "", "| shape | impl | fwd | fwd+bwd |", "|---|---|---|---|"]
    for shape, row in res["timings_ms"].items():
        for name, t in row.items():
            if name.startswith("ratio") or name == "ours_stages":
                continue
            lines.append(f"| {shape} | {name} | {t['fwd']:.3f} | {t['fwd_bwd']:.3f} |")
        for mode in ("fwd", "fwd_bwd"):
            r = row.get(f"ratio_{mode}")
            if r:
                verdict = "PASS" if r["ours_over_mamba"] <= 1.0 else "FAIL"
                lines.append(f"| {shape} | ours / {r['vs']} ({mode}) | {r['ours_over_mamba']:.3f} | {verdict} |")
    for shape, row in res["timings_ms"].items():
        st = row.get("ours_stages")
        if st:
            lines += ["", f"## Ours launch by launch at {shape} (ms, median)", "",
                      "| cumsum | state | output | fwd total | state again | dh | state again + dh "
                      "on two streams / in line | chunk bwd | group sums | fwd+bwd total |",
                      "|---|---|---|---|---|---|---|---|---|---|",
                      "| " + " | ".join(f"{st[k]:.3f}" for k in (
                          "fwd_cumsum_ms", "fwd_state_ms", "fwd_output_ms", "fwd_total_ms",
                          "bwd_state_again_ms", "bwd_dh_ms")) + " | "
                      + f"{st['bwd_state_dh_overlap_ms']:.3f} / {st['bwd_state_dh_in_line_ms']:.3f} | "
                      + " | ".join(f"{st[k]:.3f}" for k in (
                          "bwd_chunk_ms", "bwd_group_sums_ms", "fwd_bwd_total_ms")) + " |"]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
