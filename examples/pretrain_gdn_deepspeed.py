"""Pretrain a YAML-declared Gated DeltaNet (or hybrid) model with DeepSpeed's engine: ZeRO
1/2/3 data parallelism from DeepSpeed, tensor and context parallelism from Megatron-core.

Two CPU processes, TP=1, ZeRO-3, fp32 (mock data; about a minute on 2 cores):

    torchrun --nproc_per_node 2 examples/pretrain_gdn_deepspeed.py \
        --model-yaml examples/configs/tiny_gdn.yaml --ds-config examples/deepspeed/zero3.json \
        --fp32 --train-iters 10 --out runs/ds_cpu

Two GPUs, the GDN 1.3B preset, ZeRO-2, bf16, TP=2 (ZeRO-2 with the optimizer state on the
CPU: examples/deepspeed/zero2_offload.json, which needs DeepSpeed's CPU Adam build):

    torchrun --nproc_per_node 2 examples/pretrain_gdn_deepspeed.py \
        --model-yaml examples/configs/gdn_1.3b.yaml --ds-config examples/deepspeed/zero2.json \
        --tensor-model-parallel-size 2 --seq-length 4096 --micro-batch-size 2 \
        --train-iters 40 --lr 3e-4 --out runs/gdn_1.3b_zero2

Megatron's parallel state is DeepSpeed's model-parallel unit (`mpu`): DeepSpeed shards the
optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) over the data-parallel
group including the context-parallel ranks (they hold the same weights and see different
pieces of the same sequences), and counts TP-sharded parameters once per shard and replicated
ones once in the gradient norm. The GDN layer sums the gradient of its replicated
`out_norm_weight` over TP in its own backward, so no other reduction is needed; with
`--sequence-parallel` the norms would need Megatron's `finalize_model_grads`, which this
engine does not run, so the flag is refused.

Data: an indexed dataset (`--data-path PREFIX`, built by examples/data/preprocess.py; its
documents joined and cut into consecutive samples) or, by default, mock tokens drawn from a
generator seeded with (seed, sample index); either way sample i is fixed, so a run reads the
same samples at any data-parallel size and after a resume. Checkpoints are
DeepSpeed's (`--out DIR` saves to DIR/checkpoints unless `--no-save`; `--load DIR` resumes
from its latest tag).
Each iteration logs the loss and tokens/s; DIR/metrics.jsonl holds them.

`--engine megatron` runs the same model and data without DeepSpeed (one data-parallel rank,
torch AdamW, global-norm clipping): the reference the tests compare ZeRO runs against.
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

MISSING_DEEPSPEED = ("DeepSpeed is not installed: `pip install megatron-gdn[deepspeed]` (or "
                     "`pip install deepspeed`), or run with --engine megatron")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-yaml", required=True)
    p.add_argument("--ds-config", default=os.path.join(HERE, "deepspeed", "zero1.json"))
    p.add_argument("--engine", default="deepspeed", choices=("deepspeed", "megatron"))
    p.add_argument("--zero-stage", type=int, default=None, help="overrides the config's stage")
    p.add_argument("--fp32", action="store_true", help="turn the config's bf16 off")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None, help="overrides gradient_clipping")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-path", default=None,
                   help="indexed dataset prefix (examples/data/preprocess.py); default: mock tokens")
    p.add_argument("--save-interval", type=int, default=None)
    p.add_argument("--load", default=None, help="a run directory (or checkpoint folder) to resume")
    p.add_argument("--out", default=None)
    p.add_argument("--no-save", action="store_true",
                   help="write no DeepSpeed checkpoint into --out (throughput runs: a 1.3B model's "
                        "ZeRO checkpoint is ~16 GB)")
    p.add_argument("--log-interval", type=int, default=1)
    args = p.parse_args(argv)
    if args.sequence_parallel:
        raise ValueError("--sequence-parallel: not supported with DeepSpeed (the sequence-parallel "
                         "norm gradients need Megatron's finalize_model_grads)")
    if args.zero_stage is not None and args.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage {args.zero_stage}: expected 0, 1, 2 or 3")
    for name in ("tensor_model_parallel_size", "context_parallel_size", "train_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def load_ds_config(args) -> dict:
    if not os.path.isfile(args.ds_config):
        raise ValueError(f"--ds-config {args.ds_config!r}: no such file")
    with open(args.ds_config) as f:
        cfg = json.load(f)
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.fp32:
        cfg.pop("bf16", None)
        cfg.pop("fp16", None)
    if args.micro_batch_size is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    if args.lr is not None:
        cfg["optimizer"]["params"]["lr"] = args.lr
    if args.clip_grad is not None:
        if args.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0, got {args.clip_grad}")
        cfg["gradient_clipping"] = args.clip_grad
    cfg.pop("train_batch_size", None)
    return cfg


class MegatronMPU:
    """Megatron-core's parallel state under the names DeepSpeed's `mpu` argument expects.
    Model parallel = tensor parallel (no pipeline here); data parallel includes the
    context-parallel ranks (same weights, gradients averaged over both)."""

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)


def mock_batch(seed: int, first_sample: int, count: int, seq_length: int, vocab: int):
    """tokens/labels [count, seq_length] int64: sample i depends only on (seed, i)."""
    rows = []
    for i in range(first_sample, first_sample + count):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        rows.append(torch.randint(0, vocab, (seq_length + 1,), generator=g))
    data = torch.stack(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class TokenStream:
    """Samples of an indexed dataset (examples/data/preprocess.py): its documents joined into one
    token stream, sample i = tokens [i * s, i * s + s + 1) (wrapping around), so a sample
    depends only on its index, as with the mock data."""

    def __init__(self, prefix: str, vocab: int):
        import numpy

        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ValueError(f"--data-path {prefix!r}: {prefix + ext} does not exist "
                                 "(build it with examples/data/preprocess.py)")
        data = IndexedDataset(prefix)
        self.tokens = torch.from_numpy(
            numpy.concatenate([numpy.asarray(data[i], dtype=numpy.int64) for i in range(len(data))]))
        top = int(self.tokens.max())
        if top >= vocab:
            raise ValueError(f"--data-path {prefix!r}: token id {top} >= the model's vocab_size "
                             f"{vocab} (use a YAML model with a larger vocabulary)")

    def batch(self, first_sample: int, count: int, seq_length: int):
        n = self.tokens.numel()
        if n < seq_length + 1:
            raise ValueError(f"--data-path: {n} tokens, fewer than one sample ({seq_length + 1})")
        rows = [torch.arange(i * seq_length, i * seq_length + seq_length + 1) % n
                for i in range(first_sample, first_sample + count)]
        data = self.tokens[torch.stack(rows)]
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _init_distributed(engine: str, has_cuda: bool):
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if has_cuda else "gloo"
    if has_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if engine == "deepspeed":
        import importlib

        import deepspeed

        # `import deepspeed.comm.torch as m` would bind the package's `torch` attribute (torch)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        if not has_cuda:
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (a C++ build
            # of a minute or more, and a hang when two ranks race on the build lock); training
            # collectives go through torch.distributed (gloo) either way
            ds_torch_comm.build_shm_op = lambda: None
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend)
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)


def build_model(hm, args):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_gdn.hybrid import yaml_loader

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
        )
    model_parallel_cuda_manual_seed(args.seed)
    # master weights initialise from the CPU RNG: the same stream on every rank gives the same
    # full weights whatever the TP size
    torch.manual_seed(args.seed)
    config = yaml_loader.transformer_config(
        hm, tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, params_dtype=torch.float32,
    )
    model = yaml_loader.build_gpt_model(hm, config)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def _loss(model, tokens, labels):
    """Mean token loss of the micro-batch, scaled so that averaging over the CP ranks (which
    DeepSpeed does with the data-parallel average) gives the full-sequence mean."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.int64, device=tokens.device).expand(b, s).contiguous()
    batch = {"tokens": tokens, "labels": labels, "position_ids": position_ids}
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        batch["cu_seqlens"] = None
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                          cp_group=parallel_state.get_context_parallel_group())
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return losses.float().sum() * cp / (b * s)


def train(args) -> dict:
    """Run the training loop on this rank; returns {"losses": [...], "tokens_per_s": x}."""
    from megatron_gdn.hybrid import yaml_loader

    has_cuda = torch.cuda.is_available()
    if args.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise ImportError(MISSING_DEEPSPEED) from exc
        if not has_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hm = yaml_loader.load(args.model_yaml)
    ds_cfg = load_ds_config(args)
    _init_distributed(args.engine, has_cuda)
    if not has_cuda:
        import megatron_gdn.cpu

        megatron_gdn.cpu.enable()
    if args.seq_length is not None:
        hm.model["seq_length"] = args.seq_length
    seq, vocab = hm.model["seq_length"], hm.model["vocab_size"]
    if seq % (2 * args.context_parallel_size) and args.context_parallel_size > 1:
        raise ValueError(f"--seq-length {seq} must be divisible by 2 x --context-parallel-size")
    stream = TokenStream(args.data_path, vocab) if args.data_path else None
    model = build_model(hm, args)
    from megatron.core import parallel_state

    mpu = MegatronMPU()
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    cp = args.context_parallel_size
    dp_only, dp_only_rank = dp // cp, parallel_state.get_data_parallel_rank()
    mb = ds_cfg["train_micro_batch_size_per_gpu"]
    global_batch = mb * dp_only
    opt_cfg = ds_cfg["optimizer"]["params"]
    clip = ds_cfg.get("gradient_clipping", 0.0)

    if args.engine == "deepspeed":
        import deepspeed

        # DeepSpeed's train batch counts CP ranks as data parallel: each sees the same samples
        ds_cfg["train_batch_size"] = mb * dp * ds_cfg.get("gradient_accumulation_steps", 1)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=ds_cfg, mpu=mpu)
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    else:
        if dp_only != 1:
            raise ValueError(f"--engine megatron runs one data-parallel rank; got {dp_only}")
        engine = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"],
                                      betas=tuple(opt_cfg.get("betas", (0.9, 0.999))),
                                      eps=opt_cfg.get("eps", 1e-8),
                                      weight_decay=opt_cfg.get("weight_decay", 0.01))
        dtype = torch.float32
        if ds_cfg.get("bf16", {}).get("enabled"):
            raise ValueError("--engine megatron runs fp32 here: pass --fp32")

    start = 0
    ckpt_dir = os.path.join(args.out, "checkpoints") if args.out and not args.no_save else None
    if args.load is not None:
        load_dir = args.load
        if os.path.isdir(os.path.join(load_dir, "checkpoints")):
            load_dir = os.path.join(load_dir, "checkpoints")
        if args.engine != "deepspeed":
            raise ValueError("--load: only DeepSpeed checkpoints (--engine deepspeed)")
        path, client = engine.load_checkpoint(load_dir)
        if path is None:
            raise ValueError(f"--load {args.load!r}: no DeepSpeed checkpoint found")
        start = client["iteration"]

    rank0 = torch.distributed.get_rank() == 0
    metrics = None
    if args.out and rank0:
        os.makedirs(args.out, exist_ok=True)
        metrics = open(os.path.join(args.out, "metrics.jsonl"), "a" if args.load else "w")
    device = torch.device("cuda", torch.cuda.current_device()) if has_cuda else torch.device("cpu")
    losses, times = [], []
    for it in range(start, args.train_iters):
        t0 = time.perf_counter()
        first = it * global_batch + dp_only_rank * mb
        tokens, labels = (stream.batch(first, mb, seq) if stream is not None
                          else mock_batch(args.seed, first, mb, seq, vocab))
        tokens, labels = tokens.to(device), labels.to(device)
        if args.engine == "deepspeed":
            loss = _loss(engine, tokens, labels)
            engine.backward(loss)
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(engine, tokens, labels)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        report = loss.detach().float().clone()
        torch.distributed.all_reduce(report, group=mpu.get_data_parallel_group())
        report = report.item() / dp
        dt = time.perf_counter() - t0
        losses.append(report)
        times.append(dt)
        tps = global_batch * seq / dt
        # rank 0's peak since the start (parameters, ZeRO shards of the optimizer state, activations)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        if rank0 and (it + 1) % args.log_interval == 0:
            print(f"[gdn-ds] iteration {it + 1}/{args.train_iters} | loss {report:.6f} | "
                  f"{tps:.0f} tokens/s | {dt * 1e3:.0f} ms"
                  + (f" | peak {peak:.2f} GiB" if peak is not None else ""), flush=True)
        if metrics is not None:
            metrics.write(json.dumps({"iteration": it + 1, "loss": report, "tokens_per_s": tps,
                                      "peak_mem_gib": peak, "dtype": str(dtype)}) + "\n")
            metrics.flush()
        done = it + 1
        if ckpt_dir and args.engine == "deepspeed" and (
                (args.save_interval and done % args.save_interval == 0) or done == args.train_iters):
            engine.save_checkpoint(ckpt_dir, tag=f"iter_{done:07d}", client_state={"iteration": done})
    if metrics is not None:
        metrics.close()
    timed = times[1:] or times
    return {"losses": losses, "tokens_per_s": global_batch * seq * len(timed) / max(sum(timed), 1e-9)}


def main(argv=None):
    try:
        args = parse_args(argv)
        result = train(args)
    except (ValueError, ImportError) as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"pretrain_gdn_deepspeed.py: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    if torch.distributed.get_rank() == 0:
        print(f"[gdn-ds] done: loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f} | "
              f"{result['tokens_per_s']:.0f} tokens/s", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
