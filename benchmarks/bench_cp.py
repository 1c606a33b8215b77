"""Context parallelism of a stack of GatedDeltaNet layers: forward+backward time, peak memory
and bytes sent per layer, for the CP size of the launch, at several sequence lengths.

    torchrun --nproc_per_node 4 benchmarks/bench_cp.py --out benchmarks/logs/cp4
    torchrun --nproc_per_node 1 benchmarks/bench_cp.py --out benchmarks/logs/cp1
    torchrun --nproc_per_node 2 benchmarks/bench_cp.py --out DIR --smoke     # CPU, tiny
    torchrun --nproc_per_node 8 benchmarks/bench_cp.py --out DIR --tp 2      # TP=2 x CP=4

The world is `--tp` tensor-parallel ranks (heads split, no sequence parallelism) times
CP = world / tp context-parallel ranks (TP = 1 by default: the world is one CP group). Every
rank holds its CP rank's zigzag share of ONE sequence of T tokens (Megatron's layout), hidden
[T / CP, 1, h] in bf16, through `--layers` GDN mixers (residual stack) built from
megatron_gdn.specs; default dims are the 1.3B model
(hidden 2048, 6 heads of K = 256, V = 512, conv 4). Timing: CUDA events around forward +
backward, median of `--iters` after `--warmup`; peak = max allocated during those steps.

Bytes per layer: what one rank puts on the wire per direction over its CP group, from the
layout (see `bytes_per_layer`): (CP-1) x [summaries 2 * HV * K * (K + V) * 4 each way, plus the
conv halo 2 * (Kw - 1) * conv channels * 2 (bf16)], of its HV / TP heads and their channels;
none of it depends on T.
Megatron's all-to-all CP moves (CP-1)/CP of its local activations instead (grows with T).

`--impl megatron` times megatron-core 0.19.2's own GatedDeltaNet (all-to-all CP to head
parallel; needs flash-linear-attention) in the same launch where it can run (CP must divide
the head counts, so the default 6 heads stop it at CP=4: compare at `--heads 16 --value-heads
16 --key-dim 128 --value-dim 128` too); the reason is logged where it cannot.

Lengths run in the order given; the first that runs out of memory ends the sweep for that
implementation (ranks are symmetric, so they fail together; give the longest lengths last).

`--parity-tokens N` (default 8192) first checks, at N tokens, the CP stack against the same
weights without CP (full sequence on every rank, the same TP split, bf16): outputs and every
gradient, relative error <= 1e-2 (tests/tolerance.py's BF16_REL).

Correctness guarded by tests/distributed/test_context_parallel.py (the CP core vs one
process, fp32, CPU) and tests/distributed/test_context_parallel_model.py (GPTModel, CP=2,
TP=2 x CP=2 + SP).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tolerance import BF16_REL, rel_error  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for bench_cp.log / bench_cp.json")
    p.add_argument("--seq", type=int, nargs="+", default=[32768, 65536, 131072],
                   help="global sequence lengths (tokens); add longer ones to find the limit")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=6, help="key heads")
    p.add_argument("--value-heads", type=int, default=6)
    p.add_argument("--key-dim", type=int, default=256)
    p.add_argument("--value-dim", type=int, default=512)
    p.add_argument("--conv", type=int, default=4)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size; CP = world size / tp (heads must divide by tp)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--impl", nargs="+", default=["ours", "megatron"], choices=["ours", "megatron"])
    p.add_argument("--parity-tokens", type=int, default=8192, help="0 skips the parity check")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny dims: checks the script runs")
    p.add_argument("--profile-seq", type=int, nargs="*", default=[],
                   help="at these lengths, one more step under torch.profiler: rank 0 writes the "
                        "kernels by total time to profile_cp<W>_T<T>.txt (CP=1 at T / W tokens "
                        "against CP=W at T shows what context parallelism adds)")
    return p.parse_args()


class Log:
    def __init__(self, out_dir, rank):
        self.rank = rank
        self.fh = None
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            self.fh = open(os.path.join(out_dir, "bench_cp.log"), "a")

    def __call__(self, msg):
        if self.rank == 0:
            print(msg, flush=True)
            self.fh.write(msg + "\n")
            self.fh.flush()


def build_config(args, cp_size, device, tp_size=1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.float32 if args.smoke else torch.bfloat16
    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        linear_num_key_heads=args.heads, linear_num_value_heads=args.value_heads,
        linear_key_head_dim=args.key_dim, linear_value_head_dim=args.value_dim,
        linear_conv_kernel_dim=args.conv, normalization="RMSNorm",
        tensor_model_parallel_size=tp_size, context_parallel_size=cp_size,
        use_cpu_initialization=device.type == "cpu",
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        # the GDN conv's activation; Megatron's GatedDeltaNet asserts silu/swish (the default
        # gelu failed its CP=4 run with a bare assert)
        activation_func=torch.nn.functional.silu,
        bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
    )


class Stack(torch.nn.Module):
    """Residual stack of GDN mixers: x <- x + mixer(x)."""

    def __init__(self, mixers):
        super().__init__()
        self.mixers = torch.nn.ModuleList(mixers)

    def forward(self, x):
        for mixer in self.mixers:
            out, bias = mixer(x, None)
            x = x + out + (bias if bias is not None else 0)
        return x


def build_ours(config, pgc, device, seed):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gdn.specs import get_gdn_mixer_spec

    torch.manual_seed(seed)
    spec = get_gdn_mixer_spec("local")
    mixers = [build_module(spec, config=config, layer_number=i + 1, pg_collection=pgc)
              for i in range(config.num_layers)]
    return Stack(mixers).to(device)


def build_megatron(config, pgc, device, seed, log):
    """megatron-core's GatedDeltaNet with local linears and a torch RMSNorm as out_norm."""
    cp = pgc.cp.size()
    heads = (config.linear_num_key_heads, config.linear_num_value_heads)
    if any(n % cp for n in heads):
        # its all-to-all CP splits the heads over the CP ranks
        raise ValueError(f"all-to-all CP needs the head counts {heads} divisible by CP={cp}")
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
    except ImportError:
        fla_chunk_o = None
    if fla_chunk_o is not None and hasattr(fla_chunk_o, "TRITON_ABOVE_3_7_1"):
        # fla's backward refuses Hopper with triton < 3.7.1; bypassed for timing (see notes)
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
        log("megatron: fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 set to True for timing")
    from megatron.core.ssm.gated_delta_net.common import GatedDeltaNetSubmodules
    from megatron.core.ssm.gated_delta_net.gdn import GatedDeltaNet
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_gdn.cpu import TorchNorm

    torch.manual_seed(seed)
    sub = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=TorchNorm,
                                  out_proj=RowParallelLinear)
    mixers = [GatedDeltaNet(config, sub, layer_number=i + 1, pg_collection=pgc)
              for i in range(config.num_layers)]
    return Stack(mixers).to(device)


def bytes_per_layer(args, cp_size, impl, tokens, tp_size=1):
    """Bytes one rank puts on the wire per layer (forward, backward) over its CP group, one
    sequence; with TP the rank's share of the heads (HV / TP, and their conv channels).

    ours: the all-gather of the local buffer (ring: (CP-1) x the buffer leaves each rank):
    [H | M] summaries of 2 segments forward, [D | M] backward, both fp32, plus the conv halo tails
    (all-gather forward, reduce-scatter backward). megatron: its all-to-alls of the in_proj
    output to head parallel and of the kernel output back, (CP-1)/CP of each local tensor.
    """
    if cp_size == 1:
        return 0, 0
    HV, K, V = args.value_heads // tp_size, args.key_dim, args.value_dim
    H = args.heads // tp_size
    elem = 4 if args.smoke else 2
    if impl == "ours":
        conv_ch = 2 * H * K + HV * V
        halo = 2 * (args.conv - 1) * conv_ch * elem
        fwd = 2 * HV * K * (K + V) * 4 + halo
        bwd = 2 * HV * K * (K + V) * 4 + halo
        return (cp_size - 1) * fwd, (cp_size - 1) * bwd
    local = tokens // cp_size
    qkvzba = 2 * H * K + 2 * HV * V + 2 * HV
    sent = (qkvzba + HV * V) * local * elem * (cp_size - 1) // cp_size
    return sent, sent


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(model, x, dy, device, warmup, iters):
    times = []
    for i in range(warmup + iters):
        x.grad = None
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            if i == warmup:
                torch.cuda.reset_peak_memory_stats()
            start.record()
            model(x).backward(dy)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = datetime.datetime.now()
            model(x).backward(dy)
            ms = (datetime.datetime.now() - t0).total_seconds() * 1e3
        if i >= warmup:
            times.append(ms)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def profile_step(model, x, dy, device, path, header, rank):
    """One forward+backward under torch.profiler; rank 0 writes the table of kernels (CUDA time
    on a GPU, CPU time otherwise) sorted by total time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    x.grad = None
    model.zero_grad(set_to_none=True)
    with profile(activities=activities) as prof:
        model(x).backward(dy)
        sync(device)
    if rank == 0:
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                          row_limit=30, max_name_column_width=80)
        with open(path, "w") as fh:
            fh.write(header + "\n" + table + "\n")


def parity(args, config, cp_pgc, single_pgc, device, log):
    """The CP stack vs the same weights without CP on the full sequence (each rank; the same
    TP split in both)."""
    from megatron_gdn.parallel import zigzag_shard

    cp_size, rank = cp_pgc.cp.size(), cp_pgc.cp.rank()
    T = args.parity_tokens
    ref = build_ours(config, single_pgc, device, seed=1)
    cp = build_ours(config, cp_pgc, device, seed=1)
    cp.load_state_dict(ref.state_dict())
    gen = torch.Generator(device="cpu").manual_seed(2)
    x_full = torch.randn(T, 1, args.hidden, generator=gen).to(device, config.params_dtype)
    dy_full = torch.randn(T, 1, args.hidden, generator=gen).to(device, config.params_dtype)
    x_ref = x_full.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(dy_full)
    x_loc = zigzag_shard(x_full, 0, cp_size, rank).requires_grad_(True)
    y_loc = cp(x_loc)
    y_loc.backward(zigzag_shard(dy_full, 0, cp_size, rank))
    errors = {"output": rel_error(y_loc, zigzag_shard(y_ref, 0, cp_size, rank)),
              "d_input": rel_error(x_loc.grad, zigzag_shard(x_ref.grad, 0, cp_size, rank))}
    for (name, p_ref), (_, p_cp) in zip(ref.named_parameters(), cp.named_parameters()):
        grad = p_cp.grad.float().clone()
        # parameters are replicated over CP: Megatron sums their gradients over DP x CP
        dist.all_reduce(grad, group=cp_pgc.cp)
        errors[f"d {name}"] = rel_error(grad, p_ref.grad)
    worst = max(errors.values())
    for name, err in errors.items():
        log(f"  parity CP={cp_size} vs CP=1 (TP={cp_pgc.tp.size()} in both) at {T} tokens: {name}: "
            f"rel {err:.2e}")
    log(f"  parity worst {worst:.2e} (limit {BF16_REL:.0e}): {'OK' if worst <= BF16_REL else 'FAILED'}")
    del ref, cp
    return errors


def main():
    args = parse_args()
    if args.smoke:
        args.hidden, args.heads, args.value_heads, args.key_dim, args.value_dim = 64, 2, 4, 16, 16
        args.layers, args.warmup, args.iters = 2, 1, 2
        args.seq, args.parity_tokens = [64, 128], 64
        args.impl = ["ours"]
    device = torch.device("cpu")
    if not args.smoke:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        import megatron_gdn.cpu

        megatron_gdn.cpu.enable()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world, rank = dist.get_world_size(), dist.get_rank()
    tp_size = args.tp
    if tp_size < 1 or world % tp_size:
        sys.exit(f"bench_cp.py: --tp {tp_size} does not divide the world size {world}")
    cp_size = world // tp_size
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                             context_parallel_size=cp_size)
    model_parallel_cuda_manual_seed(1234)
    log = Log(args.out, rank)
    cp_pgc = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    singles = [dist.new_group([r]) for r in range(world)]
    single_pgc = ProcessGroupCollection(tp=cp_pgc.tp, cp=singles[rank])
    config = build_config(args, cp_size, device, tp_size)
    tag = f"TP={tp_size} x CP={cp_size}" if tp_size > 1 else f"CP={cp_size}"
    ftag = f"tp{tp_size}_cp{cp_size}" if tp_size > 1 else f"cp{cp_size}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"# bench_cp {datetime.datetime.now().isoformat(timespec='seconds')} {tag} on {name}, "
        f"torch {torch.__version__}, layers {args.layers}, hidden {args.hidden}, heads {args.heads}/"
        f"{args.value_heads} x K {args.key_dim} V {args.value_dim}, conv {args.conv}, {config.params_dtype}")

    record = {"cp": cp_size, "tp": tp_size, "device": name, "args": vars(args), "parity": None, "runs": []}
    if args.parity_tokens and cp_size > 1:
        record["parity"] = parity(args, config, cp_pgc, single_pgc, device, log)

    for impl in args.impl:
        try:
            if impl == "ours":
                model = build_ours(config, cp_pgc, device, seed=1)
            else:
                model = build_megatron(config, cp_pgc, device, seed=1, log=log)
        except Exception as exc:  # noqa: BLE001 - report why the comparison cannot run
            log(f"{impl}: cannot build ({type(exc).__name__}: {exc})")
            record["runs"].append({"impl": impl, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for T in args.seq:
            entry = {"impl": impl, "tokens": T}
            fwd_b, bwd_b = bytes_per_layer(args, cp_size, impl, T, tp_size)
            entry.update(bytes_fwd_per_layer=fwd_b, bytes_bwd_per_layer=bwd_b)
            try:
                if T % (2 * cp_size):
                    raise ValueError(f"{T} tokens not divisible by 2 * CP")
                gen = torch.Generator(device="cpu").manual_seed(3)
                x = torch.randn(T // cp_size, 1, args.hidden, generator=gen).to(device, config.params_dtype)
                dy = torch.randn_like(x)
                x.requires_grad_(True)
                ms, peak = time_step(model, x, dy, device, args.warmup, args.iters)
                entry.update(ms=ms, peak_gib=peak, tokens_per_s=T / ms * 1e3)
                log(f"{impl} {tag} T={T}: fwd+bwd {ms:.2f} ms, peak {peak:.2f} GiB, "
                    f"{T / ms * 1e3 / 1e6:.3f} M tok/s, sent/layer fwd {fwd_b / 2**20:.2f} MiB bwd "
                    f"{bwd_b / 2**20:.2f} MiB")
                if T in args.profile_seq:
                    path = os.path.join(args.out, f"profile_{impl}_{ftag}_T{T}.txt")
                    profile_step(model, x, dy, device, path,
                                 f"# {impl} {tag} T={T} ({T // cp_size} tokens per rank), one "
                                 f"forward+backward of {args.layers} layers, rank 0, {name}", rank)
                    log(f"{impl} {tag} T={T}: profile in {os.path.basename(path)}")
                del x, dy
            except torch.OutOfMemoryError:
                entry["error"] = "OOM"
                log(f"{impl} {tag} T={T}: out of memory (longer lengths skipped)")
                record["runs"].append(entry)
                break
            except Exception as exc:  # noqa: BLE001 - keep measuring the other lengths
                # where it was raised: a bare `assert` has no message (Megatron's all-to-all CP
                # at CP=4 / 16 heads / 128K failed with "AssertionError: " and nothing else)
                where = traceback.extract_tb(exc.__traceback__)[-1]
                entry["error"] = (f"{type(exc).__name__}: {exc} (at {os.path.basename(where.filename)}"
                                  f":{where.lineno}: {where.line})")
                log(f"{impl} {tag} T={T}: {entry['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record["runs"].append(entry)
        del model
    if rank == 0:
        with open(os.path.join(args.out, f"bench_cp_{ftag}.json"), "w") as fh:
            json.dump(record, fh, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
