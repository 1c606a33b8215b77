"""Hybrid-model benchmark: forward+backward tokens/s of whole GPTModels built from the YAML
presets, on one GPU, bf16; and the sliding-window attention core against full causal SDPA.

    python benchmarks/bench_hybrid.py --out benchmarks/logs/hybrid            # GPU
    python benchmarks/bench_hybrid.py --smoke --out /tmp/hybrid_smoke         # CPU: code path only

Models (examples/configs): gdn_1.3b, gdn_h1_1.3b (GDN + SWA 2048), qwen3_next_style (3 GDN : 1
gated attention, MoE). Sequences: 4 x 4096 and 1 x 16384 tokens per step (16K tokens each).
What is timed: `loss = model(tokens, positions, None, labels=labels).mean(); loss.backward()`
with bf16 parameters (no optimizer step), median of --iters CUDA-event timings after warm-up;
tokens/s = b * s / time. Peak memory: max_memory_allocated over one step.

Attention core (--attn): SDPACoreAttention (megatron_gdn.hybrid.attention) with window 2048 vs
torch SDPA with is_causal (its default kernel) at 1 x 16384 tokens, 16 heads of 128, bf16,
forward and forward+backward; the SWA output is checked against SDPA with the dense band mask
(relative RMS error reported; bf16 tolerance 1e-2). Then each SWA backend alone
(FlashAttention-3 where a build is found, scripts/build_fa3.sh; cuDNN's band kernels where
nvidia-cudnn-frontend is installed; FlashAttention-2 varlen; key blocks; flex), FA3's full
causal kernel, and causal SDPA with each of its kernels forced.

Acceptance (issue 5), evaluated and written to results.md: H1 tokens/s >= GDN 1.3B tokens/s at
both sequence shapes; SWA core >= 4x faster than causal attention at window 2048 / 16K tokens.

Correctness of what is timed: tests/hybrid/test_attention.py (cores vs a float64 loop, CP),
tests/hybrid/test_hybrid_parallel.py (TP/SP/PP/CP vs one process), tests/hybrid/test_yaml.py
(the presets and their parameter counts).

Writes results.json and results.md under --out.
"""
import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench_layer import sync, time_ms  # noqa: E402  (same folder: CUDA-event timing)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gdn_1.3b", "gdn_h1_1.3b", "qwen3_next_style")
SEQS = {"4x4096": (4, 4096), "1x16384": (1, 16384)}
SMOKE_MODELS = {"gdn_1.3b": "tiny_gdn", "gdn_h1_1.3b": "tiny_gdn_h1", "qwen3_next_style": "tiny_qwen3_next"}
SMOKE_SEQS = {"2x32": (2, 32)}
BF16_REL = 1e-2
T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json / results.md")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--seqs", default=",".join(SEQS), help=f"comma list of {list(SEQS)}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-models", action="store_true", help="skip the model timings")
    p.add_argument("--no-attn", action="store_true", help="skip the attention-core timings")
    p.add_argument("--attn-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--smoke", action="store_true", help="tiny presets on the CPU: exercise the code path")
    p.add_argument("--no-fusions", action="store_true",
                   help="on a GPU, leave Megatron's SwiGLU and bias-dropout-add fusions off (they are on "
                        "by default there, as in Megatron's training; the CPU never uses them)")
    p.add_argument("--keep-states", action="store_true",
                   help="the GDN kernels keep their per-chunk states for the backward "
                        "(MEGATRON_GDN_KEEP_STATES=1, pretrain_gdn.py's --gdn-keep-chunk-states)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS steps of each model and shape (torch profiler): "
                        "profile_MODEL_SEQ.txt under --out, kernels by time and by kind")
    args = p.parse_args()
    if args.keep_states:
        from megatron_gdn.kernels.utils import set_keep_states_default

        set_keep_states_default()
    return args


def init(smoke):
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        import megatron_gdn.cpu

        megatron_gdn.cpu.enable()
    else:
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)


def bench_model(name, seqs, args):
    import torch

    from megatron_gdn.hybrid import yaml_loader as yl

    hm = yl.load(ROOT / "examples" / "configs" / f"{name}.yaml")
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    # Megatron's defaults on a GPU: SwiGLU and bias-dropout-add compiled (torch.compile)
    fused = gpu and not args.no_fusions
    config = yl.transformer_config(hm, params_dtype=dtype, bf16=gpu, use_cpu_initialization=not gpu,
                                   bias_activation_fusion=fused, bias_dropout_fusion=fused)
    torch.manual_seed(0)
    model = yl.build_gpt_model(hm, config)
    model = model.to(device="cuda" if gpu else "cpu", dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    rows = []
    for seq_name, (b, s) in seqs.items():
        tokens = torch.randint(0, hm.model["vocab_size"], (b, s + 1), device=device)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(inputs, positions, None, labels=labels).float().mean()
            loss.backward()

        row = {"model": name, "seq": seq_name, "params": params, "fusions": fused,
               "keep_states": bool(args.keep_states)}
        try:
            t_first = time.perf_counter()
            step()
            sync()
            row["first_step_s"] = time.perf_counter() - t_first
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            ms = time_ms(step, args.iters, args.warmup)
            row.update(fwd_bwd_ms=ms, tokens_per_s=b * s / ms * 1e3)
            if gpu:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if args.profile:
                row["profile"] = profile_step(step, args.profile, Path(args.out) / f"profile_{name}_{seq_name}.txt",
                                              f"{name} {seq_name}")
        except Exception as exc:  # report and go on with the other shapes
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        log(row)
        rows.append(row)
    del model
    if gpu:
        torch.cuda.empty_cache()
    return rows


# kernel-name fragments -> kind, first match wins (our Triton kernels by function name, then
# torch's and cuBLAS's CUDA kernels)
KINDS = [("SSD (Mamba2)", ("_state_bwd_kernel", "_chunk_bwd_kernel", "_state_fwd_kernel",
                           "_output_fwd_kernel", "_cumsum_kernel")),
         ("GDN chunk bwd", ("_bwd_prep_kernel", "_bwd_qdo_kernel", "_bwd_dh_kernel", "_bwd_grad_",
                            "_l2norm_bwd_rows", "_gate_act_kernel", "_gate_bwd_kernel")),
         ("GDN chunk fwd", ("_prepare_kernel", "_state_kernel", "_output_kernel")),
         ("conv1d", ("_conv_",)), ("gated norm", ("_gated_rmsnorm",)),
         ("attention", ("flash", "fmha", "attention", "cudnn")),
         ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "ampere_", "sm80_", "sm90_")),
         ("cross entropy / softmax", ("softmax", "cross_entropy", "nll_loss")),
         ("torch.compile (Megatron's fusions)", ("triton_poi_", "triton_red_", "triton_per_")),
         ("reduce", ("reduce",)), ("copy / cat", ("copy", "catarray")),
         ("elementwise", ("elementwise", "vectorized", "unrolled"))]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other"


def profile_step(step, steps, path: Path, header: str) -> dict:
    """CUDA time per step by kernel and by kind (KINDS) over `steps` profiled steps; the
    tables go to `path`, the per-kind milliseconds per step are returned. Without a GPU (the
    smoke run) the same tables of the CPU ops' self time."""
    import torch

    gpu = torch.cuda.is_available()
    act = torch.profiler.ProfilerActivity
    sync()
    with torch.profiler.profile(activities=[act.CUDA if gpu else act.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    if gpu:  # kernels only: the CPU-side ops that launched them carry the same device time
        events = [(e.key, e.count, e.device_time_total) for e in prof.key_averages()
                  if e.device_time_total > 0 and "CUDA" in str(e.device_type)]
    else:
        events = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages()
                  if e.self_cpu_time_total > 0]
    by_kind: dict = {}
    for key, _, us in events:
        k = kind_of(key)
        by_kind[k] = by_kind.get(k, 0.0) + us / 1e3 / steps
    total = sum(by_kind.values()) or float("nan")
    lines = [f"{header}: {total:.2f} ms of kernels per step ({steps} steps profiled)", "",
             "| kind | ms per step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / total:.1%} |" for k, v in sorted(by_kind.items(), key=lambda x: -x[1])]
    lines += ["", "| kernel | kind | calls per step | ms per step |", "|---|---|---|---|"]
    for key, count, us in sorted(events, key=lambda e: -e[2])[:60]:
        lines.append(f"| {key[:200]} | {kind_of(key)} | {count / steps:g} | {us / 1e3 / steps:.3f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    log("\n".join(lines[:len(by_kind) + 4]))
    return {k: round(v, 3) for k, v in by_kind.items()}


def rel(a, b):
    """Relative RMS error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def bench_attention(args):
    import torch
    import torch.nn.functional as F

    from megatron_gdn.hybrid.attention import MaskSpec, SDPACoreAttention, masked_attention

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    T, H, D, w = (args.attn_tokens, 16, 128, args.window) if gpu else (256, 2, 16, 32)
    config = type("C", (), dict(kv_channels=D, attention_dropout=0.0,
                                apply_query_key_layer_scaling=False, softmax_type="vanilla"))()
    pg = type("P", (), dict(cp=None))()
    core = SDPACoreAttention(config, layer_number=1, pg_collection=pg, window=w)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(T, 1, H, D, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn(T, 1, H * D, device=device, dtype=dtype, generator=gen)

    def swa_fwd():
        return core(q, k, v, None)

    def causal_fwd():
        o = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3),
                                           v.permute(1, 2, 0, 3), is_causal=True)
        return o.permute(2, 0, 1, 3).reshape(T, 1, H * D)

    def fwd_bwd(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(dout)
        return run

    out = {"tokens": T, "heads": H, "head_dim": D, "window": w}
    pos = torch.arange(T, device=device)
    doc = torch.zeros(T, dtype=torch.long, device=device)
    with torch.no_grad():
        ref = masked_attention(q.detach(), k.detach(), v.detach(), MaskSpec(pos, doc, pos, doc, w),
                               D ** -0.5, backend="dense").reshape(T, 1, H * D)
        out["swa_rel_err_vs_dense_mask"] = rel(swa_fwd(), ref)
    for label, fn in (("swa", swa_fwd), ("causal_sdpa", causal_fwd)):
        with torch.no_grad():
            out[f"{label}_fwd_ms"] = time_ms(fn, args.iters, args.warmup)
        out[f"{label}_fwd_bwd_ms"] = time_ms(fwd_bwd(fn), args.iters, args.warmup)
    out["speedup_fwd"] = out["causal_sdpa_fwd_ms"] / out["swa_fwd_ms"]
    out["speedup_fwd_bwd"] = out["causal_sdpa_fwd_bwd_ms"] / out["swa_fwd_bwd_ms"]
    # each SWA backend on its own (the "swa" row above is what "auto" picks), with its error
    if gpu:
        for backend in ("fa3", "cudnn", "varlen", "blocks", "flex"):
            core.backend = backend
            key = f"swa_{backend}"
            try:
                with torch.no_grad():
                    out[f"{key}_rel_err_vs_dense_mask"] = rel(swa_fwd(), ref)
                    out[f"{key}_fwd_ms"] = time_ms(swa_fwd, args.iters, args.warmup)
                out[f"{key}_fwd_bwd_ms"] = time_ms(fwd_bwd(swa_fwd), args.iters, args.warmup)
                out[f"{key}_speedup_fwd_bwd"] = out["causal_sdpa_fwd_bwd_ms"] / out[f"{key}_fwd_bwd_ms"]
            except Exception as e:  # noqa: BLE001 (a backend the build lacks is a row, not a crash)
                out[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        core.backend = "auto"
        # FlashAttention-3's own full causal kernel (where a build is found): the band's ratio
        # against the fastest causal kernel here, not only against SDPA's
        from megatron_gdn.hybrid.swa_fa3 import fa3_status

        out["fa3_status"] = fa3_status()
        full = SDPACoreAttention(config, layer_number=1, pg_collection=pg, window=None)
        full.backend = "fa3"
        try:
            with torch.no_grad():
                out["causal_fa3_fwd_ms"] = time_ms(lambda: full(q, k, v, None), args.iters, args.warmup)
            out["causal_fa3_fwd_bwd_ms"] = time_ms(fwd_bwd(lambda: full(q, k, v, None)), args.iters,
                                                   args.warmup)
        except Exception as e:  # noqa: BLE001 (no FA3 build here)
            out["causal_fa3_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        # which kernel "causal SDPA" is: each backend forced (the auto choice is not reported
        # by torch); FlashAttention-2 causal is the same kernel family as the varlen window
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            key = f"causal_{name.split('_')[0].lower()}"
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    with torch.no_grad():
                        out[f"{key}_fwd_ms"] = time_ms(causal_fwd, args.iters, args.warmup)
                    out[f"{key}_fwd_bwd_ms"] = time_ms(fwd_bwd(causal_fwd), args.iters, args.warmup)
            except Exception as e:  # noqa: BLE001 (a backend this build or card lacks)
                out[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    log(out)
    return out


def environment():
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return env


def markdown(payload):
    lines = [f"# bench_hybrid on {payload['env']['device']}", "",
             f"torch {payload['env']['torch']}, triton {payload['env']['triton']}", ""]
    rows = payload.get("models", [])
    if rows:
        run_args = payload.get("args", {})
        lines += [f"Megatron's fusions {'off' if run_args.get('no_fusions') else 'on (on a GPU)'}; "
                  f"GDN chunk states {'kept from the forward' if run_args.get('keep_states') else 'recomputed in the backward'}",
                  ""]
        lines += ["| model | params | seq | fwd+bwd ms | tokens/s | peak GiB | first step s |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['params']:,} | {r['seq']} | error: {r['error'][:80]} | | | |")
                continue
            lines.append(f"| {r['model']} | {r['params'] / 1e9:.3f} B | {r['seq']} | {r['fwd_bwd_ms']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r.get('peak_gib', float('nan')):.1f} | {r['first_step_s']:.1f} |")
        by = {(r["model"], r["seq"]): r.get("tokens_per_s") for r in rows}
        lines.append("")
        for seq in sorted({r["seq"] for r in rows}):
            h1, gdn = by.get(("gdn_h1_1.3b", seq)), by.get(("gdn_1.3b", seq))
            if h1 and gdn:
                verdict = "PASS" if h1 >= gdn else "FAIL"
                lines.append(f"- H1 >= GDN tokens/s at {seq}: {h1:,.0f} vs {gdn:,.0f} -> {verdict}")
    attn = payload.get("attention")
    if attn:
        verdict = "PASS" if attn["speedup_fwd_bwd"] >= 4 else "FAIL"
        lines += ["", f"SWA core (window {attn['window']}) vs causal SDPA at {attn['tokens']} tokens, "
                  f"{attn['heads']} x {attn['head_dim']}:",
                  f"- fwd {attn['swa_fwd_ms']:.2f} ms vs {attn['causal_sdpa_fwd_ms']:.2f} ms "
                  f"({attn['speedup_fwd']:.2f}x)",
                  f"- fwd+bwd {attn['swa_fwd_bwd_ms']:.2f} ms vs {attn['causal_sdpa_fwd_bwd_ms']:.2f} ms "
                  f"({attn['speedup_fwd_bwd']:.2f}x) -> >= 4x: {verdict}",
                  f"- SWA output vs dense band-mask SDPA: rel RMS {attn['swa_rel_err_vs_dense_mask']:.2e} "
                  f"(tol {BF16_REL:.0e})"]
        if "fa3_status" in attn:
            lines.append(f"- {attn['fa3_status']}")
        for backend in ("fa3", "cudnn", "varlen", "blocks", "flex"):
            key = f"swa_{backend}"
            if f"{key}_error" in attn:
                lines.append(f"- backend {backend}: {attn[key + '_error']}")
            elif f"{key}_fwd_bwd_ms" in attn:
                lines.append(f"- backend {backend}: fwd {attn[key + '_fwd_ms']:.2f} ms, fwd+bwd "
                             f"{attn[key + '_fwd_bwd_ms']:.2f} ms ({attn[key + '_speedup_fwd_bwd']:.2f}x), "
                             f"rel RMS {attn[key + '_rel_err_vs_dense_mask']:.2e}")
        for key in ("causal_fa3", "causal_flash", "causal_cudnn", "causal_efficient"):
            if f"{key}_error" in attn:
                lines.append(f"- {key} (forced): {attn[key + '_error']}")
            elif f"{key}_fwd_bwd_ms" in attn:
                lines.append(f"- {key} (forced): fwd {attn[key + '_fwd_ms']:.2f} ms, fwd+bwd "
                             f"{attn[key + '_fwd_bwd_ms']:.2f} ms")
        if "causal_flash_fwd_bwd_ms" in attn and "swa_varlen_fwd_bwd_ms" in attn:
            lines.append(f"- varlen window vs FlashAttention-2 causal (same kernel family): "
                         f"{attn['causal_flash_fwd_bwd_ms'] / attn['swa_varlen_fwd_bwd_ms']:.2f}x fwd+bwd")
        if "causal_cudnn_fwd_bwd_ms" in attn and "swa_cudnn_fwd_bwd_ms" in attn:
            lines.append(f"- cuDNN band vs cuDNN causal (same kernel family): "
                         f"{attn['causal_cudnn_fwd_bwd_ms'] / attn['swa_cudnn_fwd_bwd_ms']:.2f}x fwd+bwd")
        if "causal_fa3_fwd_bwd_ms" in attn and "swa_fa3_fwd_bwd_ms" in attn:
            lines.append(f"- FA3 window vs FA3 causal (same kernel family): "
                         f"{attn['causal_fa3_fwd_bwd_ms'] / attn['swa_fa3_fwd_bwd_ms']:.2f}x fwd+bwd")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no GPU: run with --smoke for the CPU code path")
    init(args.smoke)
    payload = {"env": environment(), "args": vars(args)}
    if not args.no_models:
        names = [m for m in args.models.split(",") if m]
        for m in names:
            if m not in MODELS:
                raise SystemExit(f"--models: unknown model {m!r}; expected {list(MODELS)}")
        seqs = SMOKE_SEQS if args.smoke else {k: SEQS[k] for k in args.seqs.split(",")}
        payload["models"] = []
        for m in names:
            payload["models"] += bench_model(SMOKE_MODELS[m] if args.smoke else m, seqs, args)
    if not args.no_attn:
        payload["attention"] = bench_attention(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(markdown(payload))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    print(markdown(payload))


if __name__ == "__main__":
    main()
