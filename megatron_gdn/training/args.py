"""The pretraining example's own flags, its presets, and the checks that run before Megatron
creates any process group.

Our flags (everything else is Megatron's and passes through unchanged):

    --preset NAME        a set of Megatron flags placed before the command line (later flags
                         win): "cpu-tiny" is the README's CPU default
    --out DIR            run directory: metrics.jsonl, summary.json, and the checkpoints
                         (DIR/checkpoints unless --save is given; without --save-interval
                         one checkpoint after the last iteration)
    --model-yaml FILE    the model's shape from a YAML file (megatron_gdn.hybrid.yaml_loader)
    --gdn-backend NAME   "local" (megatron-core linears, runs anywhere) or "te" (Transformer
                         Engine); flags-only models
    --no-save            with --out: do not save checkpoints there
    --peak-tflops X      per-device peak for MFU (default: known GPUs in bf16/fp16)
    --throughput-warmup N  iterations left out of the tokens/s and MFU summary (default 5)
    --gdn-keep-chunk-states  the GDN kernels keep each chunk's state from the forward for the
                         backward instead of recomputing it (faster backward; memory per GDN
                         layer ~ tokens / 64 x K x V per value head, 0.5 GB at 4 x 4096
                         tokens of GDN 1.3B); sets MEGATRON_GDN_KEEP_STATES=1
    --tokenizer-type ByteTokenizer   ours; becomes NullTokenizer with --vocab-size 257
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from megatron_gdn.training.tokenizer import BYTE_TOKENIZER, BYTE_VOCAB_SIZE

__all__ = ["ExampleOptions", "split_argv", "PRESETS", "cpu_flags", "check_args", "UsageError"]


class UsageError(ValueError):
    """A bad flag or file, reported before any process-group work."""


# The CPU default: a 2-layer GDN (64 wide, 2 heads of 32) on bytes of Python source, TP=2 over
# 2 gloo processes, a few hundred iterations. The data prefix is filled in from --out.
PRESETS = {
    "cpu-tiny": [
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192", "--swiglu",
        "--num-attention-heads", "2", "--normalization", "RMSNorm",
        "--linear-num-key-heads", "2", "--linear-num-value-heads", "2",
        "--linear-key-head-dim", "32", "--linear-value-head-dim", "32",
        "--linear-conv-kernel-dim", "4",
        "--seq-length", "128", "--max-position-embeddings", "128",
        "--position-embedding-type", "none", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        "--tensor-model-parallel-size", "2",
        "--micro-batch-size", "8", "--global-batch-size", "8",
        "--train-iters", "300", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-fraction", "0.05", "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--adam-beta2", "0.95", "--init-method-std", "0.02",
        "--tokenizer-type", BYTE_TOKENIZER, "--make-vocab-size-divisible-by", "64",
        "--split", "90,5,5",
        "--eval-interval", "100", "--eval-iters", "2", "--log-interval", "10",
        "--save-interval", "300", "--ckpt-format", "torch_dist",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "1234",
        "--num-workers", "0",
    ],
}
# the preset's corpus: examples/data/build_corpus.py + preprocess.py write it here under --out
CPU_TINY_DATA = "data/stdlib_text_document"


def cpu_flags() -> List[str]:
    """Megatron flags for a machine without CUDA: the fused CUDA kernels off, weights
    initialised on the CPU, Megatron's local (non-TE) layers."""
    return [
        "--transformer-impl", "local", "--use-cpu-initialization",
        "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
        "--no-rope-fusion", "--no-persist-layer-norm",
    ]


def gpu_fallback_flags(user: List[str]) -> List[str]:
    """On a GPU machine without Transformer Engine (or without Apex, or without the fused
    weight-gradient extension), the flags whose defaults would need them: Megatron's local
    layers, no RoPE fusion (Megatron's argument check asks for TE >= 1.4 even for models
    without RoPE), no persistent LayerNorm or fused masked softmax, and no gradient-accumulation
    fusion unless our stand-in for Apex's extension works here (`training.wgrad_fusion`).
    Flags the user gave are left alone."""
    import importlib.util

    flags = []
    no_te = importlib.util.find_spec("transformer_engine") is None
    if no_te and not _flag_given(user, "--transformer-impl"):
        flags += ["--transformer-impl", "local"]
    if no_te and not _flag_given(user, "--no-rope-fusion"):
        flags += ["--no-rope-fusion"]
    # Apex's persistent LayerNorm and Megatron's fused masked softmax: without TE or Apex,
    # torch's LayerNorm asserts on the first (Megatron-LM's pretrain_gpt.py stopped there)
    no_apex = importlib.util.find_spec("apex") is None
    if no_te and no_apex and not _flag_given(user, "--no-persist-layer-norm"):
        flags += ["--no-persist-layer-norm"]
    if no_te and no_apex and not _flag_given(user, "--no-masked-softmax-fusion"):
        flags += ["--no-masked-softmax-fusion"]
    # (torch FSDP2 refuses the fusion in Megatron's argument checks)
    if no_te and (_flag_given(user, "--use-torch-fsdp2") or not _wgrad_fusion_usable()):
        flags += ["--no-gradient-accumulation-fusion"]
    return flags


def install_stand_ins(fuse_wgrad: bool) -> List[str]:
    """The other half of gpu_fallback_flags, before the model is built: Megatron's optimizer-step
    fallbacks without TE / Apex replaced by multi-tensor ops (`training.multi_tensor`) and torch's
    Adam made the fused one (`training.fused_adam`), and with
    `fuse_wgrad` (a GPU, the fusion left on) the stand-in for Apex's weight-gradient extension
    registered where it works (`training.wgrad_fusion`). Returns a line for each stand-in put
    in, for the log."""
    from megatron_gdn.training import fused_adam, multi_tensor, wgrad_fusion

    lines = []
    if multi_tensor.install():
        lines.append("no Transformer Engine / Apex: the optimizer step's grad norm and copies run "
                     "as torch._foreach ops (megatron_gdn.training.multi_tensor)")
    if fused_adam.install():
        lines.append("no Transformer Engine / Apex: torch's Adam in its fused form "
                     "(megatron_gdn.training.fused_adam)")
    if fuse_wgrad and wgrad_fusion.install() == "torch.addmm":
        lines.append("gradient-accumulation fusion: torch.addmm(out_dtype=float32) into main_grad "
                     "(megatron_gdn.training.wgrad_fusion)")
    return lines


def _wgrad_fusion_usable() -> bool:
    """Apex's fused weight-gradient extension, or megatron_gdn.training.wgrad_fusion's stand-in
    where torch's fp32-output matmul passes its check on this rank's GPU (the script installs
    it before the model is built)."""
    from megatron_gdn.training import wgrad_fusion

    return wgrad_fusion.usable_here()


@dataclass
class ExampleOptions:
    preset: Optional[str] = None
    out: Optional[str] = None
    model_yaml: Optional[str] = None
    gdn_backend: str = "local"
    peak_tflops: Optional[float] = None
    throughput_warmup: int = 5
    keep_chunk_states: bool = False
    megatron_argv: List[str] = field(default_factory=list)


def _our_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--model-yaml", default=None)
    p.add_argument("--gdn-backend", default="local")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--throughput-warmup", type=int, default=5)
    p.add_argument("--gdn-keep-chunk-states", action="store_true")
    return p


def _flag_given(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _translate_tokenizer(argv: List[str]) -> List[str]:
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--tokenizer-type" and i + 1 < len(argv) and argv[i + 1] == BYTE_TOKENIZER:
            out += ["--tokenizer-type", "NullTokenizer"]
            if not _flag_given(argv, "--vocab-size"):
                out += ["--vocab-size", str(BYTE_VOCAB_SIZE)]
            i += 2
            continue
        if a == f"--tokenizer-type={BYTE_TOKENIZER}":
            split = ["--tokenizer-type", BYTE_TOKENIZER]
            return _translate_tokenizer(argv[:i] + split + argv[i + 1:])
        out.append(a)
        i += 1
    return out


def split_argv(argv: List[str], has_cuda: bool) -> ExampleOptions:
    """Our flags out of `argv`; the rest, with the preset, the CPU flags, the YAML shape flags
    and the tokenizer translation, become Megatron's argv."""
    ours, rest = _our_parser().parse_known_args(argv)
    if ours.preset is not None and ours.preset not in PRESETS:
        raise UsageError(f"--preset {ours.preset!r}: expected one of {sorted(PRESETS)}")
    if ours.gdn_backend not in ("local", "te"):
        raise UsageError(f"--gdn-backend {ours.gdn_backend!r}: expected 'local' or 'te'")
    if ours.throughput_warmup < 0:
        raise UsageError(f"--throughput-warmup must be >= 0, got {ours.throughput_warmup}")
    user = list(rest)
    head: List[str] = []
    if ours.preset is not None:
        head += PRESETS[ours.preset]
        if ours.preset == "cpu-tiny" and not (
            _flag_given(user, "--data-path") or _flag_given(user, "--mock-data")
            or _flag_given(user, "--train-data-path")
        ):
            if ours.out is None:
                raise UsageError("--preset cpu-tiny needs --out DIR (its corpus lives in DIR/data)")
            head += ["--data-path", str(Path(ours.out) / CPU_TINY_DATA)]
    head += cpu_flags() if not has_cuda else gpu_fallback_flags(user)
    if ours.out is not None and not ours.no_save and not _flag_given(user, "--save"):
        head += ["--save", str(Path(ours.out) / "checkpoints")]
        if not _flag_given(user, "--save-interval"):
            # Megatron requires an interval with --save; it also saves after the last iteration
            head += ["--save-interval", str(10**9)]
    if ours.model_yaml is not None:
        from megatron_gdn.hybrid import yaml_loader
        from megatron_gdn.training.model import yaml_megatron_args

        hm = yaml_loader.load(ours.model_yaml)
        # the file's shape flags replace any the preset had; the user's own flags still win
        head = _drop_flags(head, yaml_megatron_args(hm, []))
        head += yaml_megatron_args(hm, user)
    return ExampleOptions(
        preset=ours.preset, out=ours.out, model_yaml=ours.model_yaml,
        gdn_backend=ours.gdn_backend, peak_tflops=ours.peak_tflops,
        throughput_warmup=ours.throughput_warmup, keep_chunk_states=ours.gdn_keep_chunk_states,
        megatron_argv=_translate_tokenizer(head + user),
    )


def _drop_flags(argv: List[str], flags_with_values: List[str]) -> List[str]:
    """`argv` without the flags (and their values) named in `flags_with_values`."""
    names = {a for a in flags_with_values if a.startswith("--")}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in names:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        out.append(argv[i])
        i += 1
    return out


def _data_prefixes(args) -> List[Tuple[str, str]]:
    """(flag, prefix) of every indexed-dataset prefix the run will open."""
    found = []
    for flag in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        values = getattr(args, flag, None) or []
        for v in values:
            try:
                float(v)
                continue  # a blend weight
            except ValueError:
                found.append(("--" + flag.replace("_", "-"), v))
    return found


def check_args(args, hybrid=None) -> None:
    """Checks of the parsed Megatron args that Megatron itself would only hit deep inside
    pretrain (after process groups exist) or not at all; raises UsageError."""
    from megatron_gdn.config import resolve_gdn_dims

    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * cp * args.pipeline_model_parallel_size) != 0:
        raise UsageError(
            f"WORLD_SIZE={world} is not divisible by tensor x context x pipeline parallel sizes "
            f"({tp} x {cp} x {args.pipeline_model_parallel_size}): launch with torchrun "
            "--nproc_per_node matching the parallel sizes"
        )
    if not args.mock_data:
        prefixes = _data_prefixes(args)
        if not prefixes and getattr(args, "data_args_path", None) is None \
                and getattr(args, "per_split_data_args_path", None) is None:
            raise UsageError("no training data: give --data-path PREFIX (an indexed dataset, see "
                             "examples/data/preprocess.py) or --mock-data")
        for flag, prefix in prefixes:
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise UsageError(f"{flag} {prefix!r}: {prefix + ext} does not exist "
                                     "(build it with examples/data/preprocess.py)")
    if not args.mock_data and args.split is not None:
        _check_split(args)
    decay = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters and decay is not None and args.lr_warmup_iters >= decay:
        raise UsageError(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than the decay "
                         f"length ({decay}: --lr-decay-iters, else --train-iters)")
    if args.seq_length % (2 * cp) != 0 and cp > 1:
        raise UsageError(f"--seq-length {args.seq_length} must be divisible by 2 x "
                         f"--context-parallel-size ({2 * cp}) (zigzag halves per rank)")
    if hybrid is None:
        try:
            resolve_gdn_dims(args, tp, cp)
        except ValueError as exc:
            raise UsageError(f"GDN layer: {exc} (flags --linear-*, --tensor-model-parallel-size, "
                             "--context-parallel-size)") from exc
    elif (hybrid.model["vocab_size"] != args.padded_vocab_size
          and int(os.environ.get("RANK", "0")) == 0):
        print(f"[gdn] note: {hybrid.source} declares vocab_size={hybrid.model['vocab_size']}; the "
              f"tokenizer's padded vocabulary ({args.padded_vocab_size}) is used", flush=True)


def _check_split(args) -> None:
    """Megatron splits a prefix by documents (bounds round(cumulative fraction x documents));
    a split that receives no document but is needed makes its sample-index builder loop
    forever, so it is refused here with the numbers."""
    from megatron.core.datasets.indexed_dataset import _IndexReader, get_idx_path

    weights = [float(w) for w in args.split.replace("/", ",").split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    needed = (args.train_iters, args.eval_iters, args.eval_iters)
    for flag, prefix in _data_prefixes(args):
        if flag != "--data-path":
            continue
        n_docs = len(_IndexReader(get_idx_path(prefix), multimodal=False).document_indices) - 1
        cum = [0.0]
        for w in weights[:3]:
            cum.append(cum[-1] + w / total)
        bounds = [int(round(c * n_docs)) for c in cum]
        for i, name in enumerate(("train", "valid", "test")):
            if needed[i] and weights[i] > 0 and bounds[i + 1] - bounds[i] == 0:
                raise UsageError(
                    f"--split {args.split} gives the {name} split 0 of the {n_docs} documents in "
                    f"{prefix!r}: use more (or smaller) documents or a larger {name} share")
