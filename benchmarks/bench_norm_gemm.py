"""Two pieces of the GDN 1.3B step outside the chunk kernels, at its shapes (4 x 4096 tokens):

- the gated norm (98,304 rows of 512; Mamba2's gate-first norm, 16,384 rows of 8 x 512
  groups): forward, and the backward at each of `BWD_CONFIGS` pinned and as tuned, each checked
  against the fp32 torch path, with the bytes moved per second;
- in_proj's matmuls (2048 -> 9228 + 4 pad columns) and fc1's weight gradient (2048 -> 11264):
  the weight gradient as the plain backward forms it and into an fp32 main_grad (Megatron's
  gradient-accumulation fusion, through megatron_gdn.training.wgrad_fusion's addmm), on the
  unpadded and the padded rows, with the kernel each runs on (Hopper's or Ampere's).

    python benchmarks/bench_norm_gemm.py --out DIR          (GPU)
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import timed  # noqa: E402

from megatron_gdn.kernels.gated_norm import gate_then_rmsnorm, gated_rmsnorm, norm  # noqa: E402
from megatron_gdn.kernels.gated_norm.torch_ref import torch_gate_then_rmsnorm, torch_gated_rmsnorm  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def norm_rows(device, iters):
    rows = []
    cases = [("gdn_1.3b", (4 * 4096, 6, 512), 1, False), ("mamba2_8groups", (4 * 4096, 4096), 8, True)]
    for name, shape, groups, gate_first in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        x, z, dy = (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3))
        w = (1 + 0.1 * torch.randn(shape[-1], generator=gen, device=device)).to(torch.bfloat16)
        fn = (lambda a, b, c: gate_then_rmsnorm(a, b, c, groups=groups)) if gate_first else gated_rmsnorm
        ref = (lambda a, b, c: torch_gate_then_rmsnorm(a, b, c, groups, 1e-6)) if gate_first \
            else (lambda a, b, c: torch_gated_rmsnorm(a, b, c, 1e-6))
        leaves = [t.float().requires_grad_() for t in (x, z, w)]
        ref(*leaves).backward(dy.float())
        ref_grads = [t.grad for t in leaves]
        nbytes = x.numel() * 2
        fwd_ms = timed(lambda: fn(x, z, w), device, iters)
        rows.append(dict(case=name, pass_="forward", config="-", ms=fwd_ms,
                         TBps=3 * nbytes / fwd_ms / 1e9))
        for config in list(norm.BWD_CONFIGS) + [None]:
            norm.BWD_PIN = config
            leaves = [t.clone().requires_grad_() for t in (x, z, w)]
            y = fn(*leaves)
            y.backward(dy, retain_graph=True)
            errs = {n: rel_err(t.grad, r) for n, t, r in zip(("dx", "dz", "dw"), leaves, ref_grads)}
            ms = timed(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), device, iters)
            tuned = [c for k, c in norm._BWD_TUNED.items() if k[:2] == (shape[-1] // groups, groups)]
            label = str(config) if config else f"tuned: {tuned[-1] if tuned else '-'}"
            rows.append(dict(case=name, pass_="backward", config=label, ms=ms,
                             TBps=5 * nbytes / ms / 1e9, max_rel_err=max(errs.values())))
            print(json.dumps(rows[-1]), flush=True)
        norm.BWD_PIN = None
    return rows


def kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return ", ".join(sorted({n[:60] for n in names}))


def gemm_rows(device, iters):
    from megatron_gdn.training import wgrad_fusion

    T, h, n, pad = 4 * 4096, 2048, 9228, 4
    gen = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(T, h, generator=gen, **bf)
    w = torch.randn(n, h, generator=gen, **bf) * 0.02
    dy_pad = torch.randn(T, n + pad, generator=gen, **bf)
    main_grad = torch.zeros(n, h, device=device, dtype=torch.float32)
    fc1_dy = torch.randn(T, 11264, generator=gen, **bf)
    fc1_grad = torch.zeros(11264, h, device=device, dtype=torch.float32)
    cases = {
        "in_proj fwd (padded weight)": lambda: F.linear(x, F.pad(w, (0, 0, 0, pad))),
        "in_proj dgrad (padded weight)": lambda: dy_pad @ F.pad(w, (0, 0, 0, pad)),
        "in_proj wgrad, n rows (now)": lambda: dy_pad[:, :n].t() @ x,
        "in_proj wgrad, n + pad rows, sliced": lambda: (dy_pad.t() @ x)[:n],
        "in_proj wgrad fp32 into main_grad, n rows (now)":
            lambda: wgrad_fusion.wgrad_gemm_accum_fp32(x, dy_pad[:, :n], main_grad),
        "in_proj wgrad fp32, n + pad rows, added to main_grad":
            lambda: main_grad.add_(torch.mm(dy_pad.t(), x, out_dtype=torch.float32)[:n]),
        "fc1 wgrad bf16": lambda: fc1_dy.t() @ x,
        "fc1 wgrad fp32 into main_grad": lambda: wgrad_fusion.wgrad_gemm_accum_fp32(x, fc1_dy, fc1_grad),
    }
    rows = []
    for name, fn in cases.items():
        ms = timed(fn, device, iters)
        flops = 2 * T * h * (11264 if name.startswith("fc1") else n)
        rows.append(dict(case=name, ms=ms, TFLOPs=flops / ms / 1e9, kernels=kernel_names(fn)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_norm_gemm.py needs a GPU")
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    norms = norm_rows(device, args.iters)
    gemms = gemm_rows(device, args.iters)
    lines = [f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| norm | pass | config (per SM, values, warps, stages) | ms | TB/s | max rel err |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['pass_']} | {r['config']} | {r['ms']:.3f} | {r['TBps']:.2f} | "
              f"{r.get('max_rel_err', float('nan')):.1e} |" for r in norms]
    lines += ["", "| matmul | ms | TFLOP/s | kernels |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['ms']:.3f} | {r['TFLOPs']:.0f} | {r['kernels']} |" for r in gemms]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(dict(norm=norms, gemm=gemms), indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
