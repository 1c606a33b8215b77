"""Layer benchmark: one GatedDeltaNet layer (ours) forward+backward next to megatron-core
0.19.2's own GatedDeltaNet, in one process, on one GPU, bf16; plus a TP=2 parity mode.

    python benchmarks/bench_layer.py --out benchmarks/logs/layer            # timings, 1 GPU
    torchrun --nproc_per_node 2 benchmarks/bench_layer.py --tp-parity --out benchmarks/logs/layer_tp2
    python benchmarks/bench_layer.py --smoke --out /tmp/layer_smoke         # CPU: code path only

Shapes (hidden 2048): "qwen3next" 16 key / 32 value heads of K = V = 128; "gdn1.3b" 6 heads of
K = 256, V = 512 (fla's default GDN 1.3B). Each at 16K tokens as 4 x 4096 and 1 x 16384.

What is timed: `out, _ = layer(x); out.backward(dout)` with x [s, b, h] bf16 (requires grad),
bf16 parameters, median of --iters CUDA-event timings after warm-up; "fwd" is the forward alone
(autograd recording). Tokens/s = b * s / fwd+bwd time. Peak memory: max_memory_allocated during
one fwd+bwd, absolute (parameters, input and its gradient included) and above the memory held
before the step. "first call" is the wall time of the very first fwd+bwd at a shape (Triton
compilation and autotuning included) with a fresh, empty Triton cache (TRITON_CACHE_DIR is
pointed at a new temporary folder before Triton is imported, unless --keep-triton-cache).

Megatron's GDN (megatron.core.ssm.gated_delta_net.GatedDeltaNet) is built from a ModuleSpec with
local ColumnParallelLinear (in_proj) / RowParallelLinear (out_proj) and Megatron's
WrappedTorchNorm (torch RMSNorm over the value head dim) as out_norm: its own spec helper asserts
Transformer Engine. Its kernels come from flash-linear-attention (fla) 0.6.0, whose Triton
backward refuses to run on Hopper with triton < 3.7.1; this script sets
fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True to time it anyway.

Correctness of what is timed: --check (on by default) copies our weights into Megatron's layer
(same [q|k|v|z|b|a] in_proj layout at TP=1) and compares outputs and every gradient (bf16,
relative RMS, reported); tests/layer/test_layer_single.py guards our layer against the float64
recurrence and tests/layer/test_layer_parallel.py its TP/SP/PP/DP behaviour on CPU.

TP parity (--tp-parity, 2 ranks): a small GPTModel built with megatron_gdn.specs.gdn_layer_spec
in bf16: TP=1 on every rank, then TP=2 with the same global weights (resliced per GDN section);
logits relative error <= 1e-2 required, loss and gradient errors reported.

Writes results.json and results.md under --out.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

SHAPES = {
    # name: hidden, key heads, value heads, K, V
    "qwen3next": (2048, 16, 32, 128, 128),
    "gdn1.3b": (2048, 6, 6, 256, 512),
}
SEQS = {"4x4096": (4, 4096), "1x16384": (1, 16384)}
BF16_REL = 1e-2
T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json / results.md")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--seqs", default=",".join(SEQS), help=f"comma list of {list(SEQS)}")
    p.add_argument("--impls", default="ours,megatron", help="comma list of ours, megatron")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-check", action="store_true", help="skip the ours-vs-Megatron parity check")
    p.add_argument("--keep-triton-cache", action="store_true",
                   help="reuse the existing Triton cache (first-call times then exclude compilation)")
    p.add_argument("--tp-parity", action="store_true", help="TP=2 vs TP=1 bf16 parity (torchrun, 2 ranks)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: exercise the code path")
    p.add_argument("--keep-states", action="store_true",
                   help="our kernels keep their per-chunk states for the backward "
                        "(MEGATRON_GDN_KEEP_STATES=1)")
    args = p.parse_args()
    if args.keep_states:
        from megatron_gdn.kernels.utils import set_keep_states_default

        set_keep_states_default()
    return args


# ------------------------------------------------------------------------------ setup
def init_distributed(smoke):
    import torch
    import torch.distributed as dist

    if smoke or not torch.cuda.is_available():
        import megatron_gdn.cpu

        megatron_gdn.cpu.enable()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def init_megatron(tp):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)


def layer_config(shape, dtype, tp=1):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    hidden, H, HV, K, V = shape
    return TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=16, tensor_model_parallel_size=tp,
        linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=K,
        linear_value_head_dim=V, linear_conv_kernel_dim=4, normalization="RMSNorm",
        layernorm_epsilon=1e-6, activation_func=F.silu, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=False,
    )


def build_ours(config):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gdn.specs import get_gdn_mixer_spec

    pg = ProcessGroupCollection.use_mpu_process_groups()
    return build_module(get_gdn_mixer_spec("local"), config=config, layer_number=1, pg_collection=pg)


def _megatron_gdn_without_fla(config):
    """--smoke only (CPU, no fla): run Megatron's GDN through its own torch paths
    (deterministic_mode: torch conv and torch chunked rule) with a torch l2norm, so the weight
    mapping and the parity check are exercised without fla. Never used for timings."""
    import torch
    from megatron.core.ssm.gated_delta_net import common

    try:
        import fla  # noqa: F401
        return
    except ImportError:
        pass
    common.HAVE_FLA = True
    common.l2norm = lambda x: x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    config.deterministic_mode = True


def build_megatron(config, smoke=False):
    """megatron-core's GatedDeltaNet with local linears and a torch RMSNorm (its own spec
    helper requires Transformer Engine)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if smoke:
        _megatron_gdn_without_fla(config)
    else:
        import fla.ops.common.chunk_o as fla_chunk_o

        # fla 0.6.0 refuses its Triton backward on Hopper with triton < 3.7.1: bypass to time it
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    spec = ModuleSpec(
        module=GatedDeltaNet,
        submodules=GatedDeltaNetSubmodules(
            in_proj=ColumnParallelLinear, out_norm=WrappedTorchNorm, out_proj=RowParallelLinear
        ),
    )
    pg = ProcessGroupCollection.use_mpu_process_groups()
    layer = build_module(spec, config=config, layer_number=1, pg_collection=pg)
    # WrappedTorchNorm makes an fp32 torch RMSNorm on the CPU; in training Megatron's
    # Float16Module casts every parameter to the model dtype (and the model sits on the GPU),
    # so do the same here
    import torch

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    return layer.to(device=device, dtype=config.params_dtype)


def copy_ours_into_megatron(ours, theirs):
    import torch

    with torch.no_grad():
        theirs.in_proj.weight.copy_(ours.in_proj.weight)
        theirs.conv1d.weight.copy_(ours.conv_weight.unsqueeze(1))
        theirs.A_log.copy_(ours.A_log)
        theirs.dt_bias.copy_(ours.dt_bias)
        theirs.out_norm.weight.copy_(ours.out_norm_weight)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -------------------------------------------------------------------------- timing
def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, iters, warmup):
    import torch

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_layer(layer, b, s, hidden, dtype, device, iters, warmup):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s, b, hidden, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    dout = torch.randn(s, b, hidden, device=device, dtype=dtype, generator=gen)

    def fwd():
        return layer(x, None)[0]

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        fwd().backward(dout)

    sync()
    t = time.perf_counter()
    layer.zero_grad(set_to_none=True)
    out = fwd()
    sync()
    first_fwd_s = time.perf_counter() - t
    out.backward(dout)
    sync()
    first_call_s = time.perf_counter() - t
    x.grad = None
    del out

    fwd_ms = time_ms(fwd, iters, warmup)
    fwd_bwd_ms = time_ms(fwd_bwd, iters, warmup)
    peak_gib = peak_above_gib = None
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd()
        sync()
        peak = torch.cuda.max_memory_allocated()
        peak_gib, peak_above_gib = peak / 2**30, (peak - before) / 2**30
    return dict(first_call_s=first_call_s, first_fwd_s=first_fwd_s, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                tokens_per_s=b * s / (fwd_bwd_ms * 1e-3), peak_gib=peak_gib, peak_above_gib=peak_above_gib)


def check_parity(ours, theirs, b, s, hidden, dtype, device):
    """Same weights, same input: output, d input and every parameter gradient."""
    import torch

    copy_ours_into_megatron(ours, theirs)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(s, b, hidden, device=device, dtype=dtype, generator=gen)
    dout = torch.randn(s, b, hidden, device=device, dtype=dtype, generator=gen)
    results = {}
    grads = []
    for layer in (ours, theirs):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = layer(xi, None)[0]
        out.backward(dout)
        grads.append((out, xi.grad))
    results["out"] = rel(grads[0][0], grads[1][0])
    results["d_hidden"] = rel(grads[0][1], grads[1][1])
    pairs = {
        "d_in_proj": (ours.in_proj.weight.grad, theirs.in_proj.weight.grad),
        "d_conv": (ours.conv_weight.grad, theirs.conv1d.weight.grad.squeeze(1)),
        "d_A_log": (ours.A_log.grad, theirs.A_log.grad),
        "d_dt_bias": (ours.dt_bias.grad, theirs.dt_bias.grad),
        "d_out_norm": (ours.out_norm_weight.grad, theirs.out_norm.weight.grad),
        "d_out_proj": (ours.out_proj.weight.grad, theirs.out_proj.weight.grad),
    }
    for name, (a, c) in pairs.items():
        results[name] = rel(a, c)
    return results


def run_timings(args):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    seqs = {n: SEQS[n] for n in args.seqs.split(",")}
    if args.smoke:
        shapes = {"smoke": (64, 2, 4, 16, 16)}
        seqs = {"2x64": (2, 64)}
        args.iters, args.warmup = 2, 1
    impls = args.impls.split(",")
    init_megatron(tp=1)
    rows = []
    for shape_name, shape in shapes.items():
        config = layer_config(shape, dtype)
        for seq_name, (b, s) in seqs.items():
            for impl in impls:
                row = dict(shape=shape_name, seq=seq_name, impl=impl, b=b, s=s)
                try:
                    torch.manual_seed(0)
                    layer = build_ours(config) if impl == "ours" else build_megatron(config, args.smoke)
                    row.update(bench_layer(layer, b, s, shape[0], dtype, device, args.iters, args.warmup))
                    log(f"{shape_name} {seq_name} {impl}: " + ", ".join(
                        f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
                except Exception as exc:  # a missing fla must not hide our numbers
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"{shape_name} {seq_name} {impl}: FAILED {row['error']}")
                    traceback.print_exc()
                finally:
                    layer = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
            if not args.no_check and "megatron" in impls and "ours" in impls:
                row = dict(shape=shape_name, seq=seq_name, impl="check ours vs megatron", b=b, s=s)
                try:
                    torch.manual_seed(0)
                    ours, theirs = build_ours(config), build_megatron(config, args.smoke)
                    errs = check_parity(ours, theirs, b, s, shape[0], dtype, device)
                    row["rel_errors"] = errs
                    row["ok"] = max(errs.values()) <= BF16_REL if dtype == torch.bfloat16 else None
                    log(f"{shape_name} {seq_name} parity: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"{shape_name} {seq_name} parity: FAILED {row['error']}")
                finally:
                    ours = theirs = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
    return rows


# ---------------------------------------------------------------------- TP parity
# global (TP=1) widths of the fused GDN tensors, split along dim 0: rank r holds its rows of
# every section
def _gdn_sections(config):
    H, HV = config.linear_num_key_heads, config.linear_num_value_heads
    K, V = config.linear_key_head_dim, config.linear_value_head_dim
    return {"self_attention.in_proj.weight": (H * K, H * K, HV * V, HV * V, HV, HV),
            "self_attention.conv_weight": (H * K, H * K, HV * V)}


def _local_slice(name, full, param, tp, rank, sections):
    import torch

    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    widths = next((w for suffix, w in sections.items() if name.endswith(suffix)), None)
    if widths is None:
        return full.chunk(tp, dim=param.partition_dim)[rank]
    return torch.cat([part.chunk(tp, dim=0)[rank] for part in full.split(widths, dim=0)])


def run_tp_parity(args):
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    import torch.nn.functional as F

    from megatron_gdn.specs import gdn_layer_spec

    world = torch.distributed.get_world_size()
    if world != 2:
        raise ValueError(f"--tp-parity needs 2 ranks (torchrun --nproc_per_node 2), got {world}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, H, HV, K, V = (256, 4, 8, 32, 32) if args.smoke else (1024, 8, 16, 128, 128)
    seq, batch, vocab, layers = (64, 2, 256, 2) if args.smoke else (4096, 2, 8192, 2)

    def build(tp):
        from megatron.core.transformer import TransformerConfig

        config = TransformerConfig(
            num_layers=layers, hidden_size=hidden, num_attention_heads=8, ffn_hidden_size=4 * hidden,
            linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=K,
            linear_value_head_dim=V, normalization="RMSNorm", tensor_model_parallel_size=tp,
            params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
        torch.manual_seed(1234)
        model = GPTModel(config=config, transformer_layer_spec=gdn_layer_spec, vocab_size=vocab,
                         max_sequence_length=seq, parallel_output=False)
        # as Megatron's Float16Module does in training: every parameter in the compute dtype
        # (GPTModel makes its learned position embeddings float32 whatever params_dtype says)
        return model.to(device=device, dtype=dtype), config

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(seq, device=device).unsqueeze(0).expand_as(inputs)

    def step(model):
        # parallel_output=False: full-vocabulary logits [b, s, vocab] on every rank
        logits = model(inputs, positions, None)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))
        loss.backward()
        return logits.detach(), loss.detach()

    init_megatron(tp=1)
    model1, config1 = build(1)
    logits1, loss1 = step(model1)
    global_state = {n: p.detach().clone() for n, p in model1.named_parameters()}
    grads1 = {n: p.grad.detach().clone() for n, p in model1.named_parameters()}
    model1 = None

    init_megatron(tp=2)
    model2, config2 = build(2)
    tp, rank = 2, parallel_state.get_tensor_model_parallel_rank()
    sections = _gdn_sections(config2)
    with torch.no_grad():
        for name, param in model2.named_parameters():
            param.copy_(_local_slice(name, global_state[name], param, tp, rank, sections))
    logits2, loss2 = step(model2)
    grad_errs = {}
    for name, param in model2.named_parameters():
        expect = _local_slice(name, grads1[name], param, tp, rank, sections)
        grad_errs[name] = rel(param.grad, expect)
    result = dict(rank=rank, logits_rel=rel(logits2, logits1), loss_tp1=loss1.item(), loss_tp2=loss2.item(),
                  max_grad_rel=max(grad_errs.values()), worst_grad=max(grad_errs, key=grad_errs.get),
                  device=str(device), dtype=str(dtype),
                  shape=dict(hidden=hidden, H=H, HV=HV, K=K, V=V, seq=seq, batch=batch, vocab=vocab, layers=layers))
    result["ok"] = result["logits_rel"] <= BF16_REL
    log(f"rank {rank}: " + json.dumps(result))
    return result


# ---------------------------------------------------------------------------- main
def write(args, payload, md_lines):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md_lines) + "\n")
    log(f"wrote {args.out}/results.json and results.md")


def environment():
    import torch
    import triton

    env = dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0])
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        env["fla"] = None
    return env


def main():
    args = parse_args()
    if not args.keep_triton_cache and not args.tp_parity:
        # first-call times must include compilation: an empty cache, set before Triton imports
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_bench_layer_")
        # where a first call's time goes: Triton logs each autotuning and how long it took
        os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")
    import torch

    init_distributed(args.smoke)
    env = environment()
    log(json.dumps(env))
    if args.tp_parity:
        result = run_tp_parity(args)
        results = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(results, result)
        if torch.distributed.get_rank() == 0:
            md = ["| rank | logits rel err | loss TP=1 | loss TP=2 | max grad rel err (param) | ok (<= 1e-2) |",
                  "|---|---|---|---|---|---|"]
            md += [f"| {r['rank']} | {r['logits_rel']:.2e} | {r['loss_tp1']:.5f} | {r['loss_tp2']:.5f} | "
                   f"{r['max_grad_rel']:.2e} ({r['worst_grad']}) | {r['ok']} |" for r in results]
            write(args, dict(env=env, tp_parity=results), md)
        ok = all(r["ok"] for r in results)
    else:
        rows = run_timings(args)
        md = [f"device: {env.get('device', 'cpu')}, torch {env['torch']}, triton {env['triton']}, fla {env['fla']}",
              "", "| shape | tokens | impl | fwd ms | fwd+bwd ms | tokens/s | peak GiB (above start) | first call s |",
              "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "rel_errors" in r or r["impl"].startswith("check"):
                continue
            if "error" in r:
                md.append(f"| {r['shape']} | {r['seq']} | {r['impl']} | failed: {r['error'][:80]} | | | | |")
                continue
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} ({r['peak_above_gib']:.2f})"
            md.append(f"| {r['shape']} | {r['seq']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                      f"{r['tokens_per_s'] / 1e6:.3f}M | {peak} | {r['first_call_s']:.1f} |")
        checks = [r for r in rows if r["impl"].startswith("check")]
        if checks:
            md += ["", "ours vs Megatron's GDN, same weights (relative RMS error):", ""]
            for r in checks:
                detail = r.get("error") or ", ".join(f"{k} {v:.2e}" for k, v in r["rel_errors"].items())
                md.append(f"- {r['shape']} {r['seq']}: {detail}")
        write(args, dict(env=env, rows=rows), md)
        ok = all("error" not in r for r in rows if r["impl"] == "ours")
        ok = ok and all(r.get("ok") in (True, None) for r in checks if "error" not in r)
    torch.distributed.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
