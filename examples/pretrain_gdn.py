"""Pretrain a Gated DeltaNet (or hybrid) language model with `megatron.training.pretrain`.

CPU default (the README's main command; 2 gloo processes, TP=2, a tiny GDN on bytes of the
Python standard library, a few minutes on 2 cores):

    bash scripts/main.sh                              # = the three steps below
    python examples/data/build_corpus.py --out runs/cpu_demo/data
    python examples/data/preprocess.py --input runs/cpu_demo/data/stdlib.jsonl \
        --output-prefix runs/cpu_demo/data/stdlib --tokenizer-type ByteTokenizer
    torchrun --nproc_per_node 2 examples/pretrain_gdn.py --preset cpu-tiny --out runs/cpu_demo

One GPU, the GDN 1.3B preset, bf16, 4K context (mock data; use --data-path for real data):

    torchrun --nproc_per_node 1 examples/pretrain_gdn.py \
        --model-yaml examples/configs/gdn_1.3b.yaml --bf16 --seq-length 4096 \
        --micro-batch-size 2 --global-batch-size 16 --train-iters 40 --lr 3e-4 \
        --tokenizer-type NullTokenizer --vocab-size 32000 --mock-data \
        --log-interval 5 --eval-iters 0 --no-save --out runs/gdn_1.3b

Eight GPUs of one node, TP=2 x CP=2 x DP=2, 32K context (examples/launch/ for multi-node):

    torchrun --nproc_per_node 8 examples/pretrain_gdn.py \
        --model-yaml examples/configs/gdn_1.3b.yaml --bf16 --seq-length 32768 \
        --tensor-model-parallel-size 2 --context-parallel-size 2 --use-distributed-optimizer \
        --micro-batch-size 1 --global-batch-size 16 --train-iters 40 --lr 3e-4 \
        --tokenizer-type NullTokenizer --vocab-size 32000 --mock-data \
        --log-interval 5 --eval-iters 0 --no-save --out runs/gdn_1.3b_cp

Everything not listed under `megatron_gdn.training.args` is a Megatron flag (parallel sizes,
data, optimizer, schedule, checkpointing --save/--load/--save-interval, logging). The model
comes from `--model-yaml FILE` or from Megatron's flags (--num-layers, --hidden-size,
--ffn-hidden-size, --linear-num-key-heads, --linear-key-head-dim, ...), every layer being
`megatron_gdn.specs.get_gdn_layer_spec`. Bad flags or a bad YAML file stop the run with one
message before any process group is created.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"pretrain_gdn.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _describe(exc: BaseException) -> str:
    """The exception's message, or for a bare `assert` in Megatron's checks its source line."""
    if str(exc):
        return str(exc)
    import traceback

    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{frame.line} ({os.path.basename(frame.filename)}:{frame.lineno})"


def _parse(argv):
    """Our flags, then Megatron's parse + validate (no process group yet), then our checks."""
    from megatron_gdn.training.args import UsageError, check_args, split_argv

    has_cuda = torch.cuda.is_available()
    try:
        opts = split_argv(argv, has_cuda)
    except ValueError as exc:  # UsageError, HybridConfigError
        _fail(str(exc))
    import megatron_gdn.cpu

    if not has_cuda:
        megatron_gdn.cpu.enable()
    megatron_gdn.cpu.use_shipped_dataset_helpers()

    from megatron.training.arguments import parse_and_validate_args

    sys.argv = [sys.argv[0]] + opts.megatron_argv
    try:
        args = parse_and_validate_args()
    except (AssertionError, ValueError, FileNotFoundError) as exc:
        _fail(f"Megatron rejected the arguments: {_describe(exc)}")

    hybrid = None
    if opts.model_yaml is not None:
        from megatron_gdn.hybrid import yaml_loader

        hybrid = yaml_loader.load(opts.model_yaml)
    try:
        check_args(args, hybrid)
        if hybrid is not None:
            from megatron_gdn.training.model import _config_from_args, set_model_source

            set_model_source(opts.gdn_backend, hybrid)
            # builds the TransformerConfig once here so YAML/parallel conflicts fail now
            _config_from_args(args)
    except (UsageError, ValueError) as exc:
        _fail(str(exc))
    return opts, args, hybrid


def _single_process_env() -> None:
    """`python examples/pretrain_gdn.py ...` without torchrun: one process, a local rendezvous."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv=None):
    _single_process_env()
    opts, args, hybrid = _parse(sys.argv[1:] if argv is None else argv)

    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.training import pretrain

    from megatron_gdn.training.data import train_valid_test_datasets_provider
    from megatron_gdn.training.model import model_provider, set_model_source
    from megatron_gdn.training.step import forward_step
    from megatron_gdn.training.throughput import IterationMeter, flops_per_token, peak_tflops

    set_model_source(opts.gdn_backend, hybrid)
    from megatron_gdn.training.args import install_stand_ins

    # without TE and Apex: Megatron's optimizer step norms and copies parameter by parameter,
    # and its linears fuse the weight-gradient accumulation only with Apex's extension (the
    # flags left that fusion on only where our stand-in works here)
    for line in install_stand_ins(torch.cuda.is_available() and args.gradient_accumulation_fusion):
        if os.environ.get("RANK", "0") == "0":
            print("[gdn] " + line, flush=True)
    if opts.keep_chunk_states:
        from megatron_gdn.kernels.utils import set_keep_states_default

        # read by the GDN kernels at every call (kernels.utils.keep_states_default)
        set_keep_states_default()
    # master weights initialise from the CPU RNG (--use-cpu-initialization): the same stream
    # on every rank gives the same full weights whatever the TP size
    torch.manual_seed(args.seed)
    meter = IterationMeter(args, flops_per_token(args, hybrid), peak_tflops(args, opts.peak_tflops),
                           opts.out, warmup=opts.throughput_warmup)
    meter.install()
    pretrain(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)

    summary = meter.summary()
    if summary is not None:
        import json

        line = (f"[gdn] done: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
                if summary["first_loss"] is not None else "[gdn] done")
        if "tokens_per_s" in summary:
            line += (f" | {summary['tokens_per_s']:.0f} tokens/s, "
                     f"{summary['tokens_per_s_per_gpu']:.0f}/device over "
                     f"{summary['timed_iterations']} iterations after warm-up")
        if summary.get("mfu") is not None:
            line += f" | MFU {100 * summary['mfu']:.1f}%"
        print(line, flush=True)
        if opts.out:
            os.makedirs(opts.out, exist_ok=True)
            with open(os.path.join(opts.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
