"""Train a small model on one synthetic recall task, then score it at several lengths (one process).

    python examples/eval/train_recall.py --config examples/eval/configs/gdn.yaml --task mqar \
        --num-kv 16 --seq-length 256 --steps 4000 --batch-size 64 --lr 1e-3 --seed 0 \
        --eval-lengths 256 512 1024 2048 --out runs/mqar_gdn_s0

The model is a megatron.core GPTModel built from a YAML model file (megatron_gdn.hybrid.
yaml_loader) in one process with Megatron's parallel state (world size 1: gloo on CPU, nccl
on a GPU). Batches come straight from recall_tasks (a fresh batch per step, seeds disjoint from
the evaluation's); the loss is cross-entropy at the answer positions only (Zoology's MQAR
recipe). Writes DIR/metrics.jsonl (one line per logged step), DIR/model.pt, DIR/meta.json
(the YAML text and the task) and DIR/eval.json (recall_eval's accuracy per length).

Ablations are fields of the YAML `gdn:` section (GatedDeltaNet's own options, default true):

    gdn: {..., decay: false}          DeltaNet: g = 0 exactly, no `a` rows, A_log or dt_bias
    gdn: {..., short_conv: false}     no short convolution: q, k, v = SiLU(projection)
    gdn: {..., output_gate: false}    no SiLU(z) output gate: plain per-head RMSNorm, no z rows
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recall_eval import evaluate_lengths, format_table  # noqa: E402
from recall_tasks import IGNORE, NIAH_PRESETS, TASKS, make_task  # noqa: E402

__all__ = ["setup_megatron", "build_model", "train_seed", "checkpoint_predictor", "main"]


def train_seed(seed: int, step: int) -> int:
    """Even seeds for training batches (recall_eval.eval_seed uses odd ones)."""
    return 2 * (seed * 1_000_003 + step)


def setup_megatron(seed: int) -> torch.device:
    """World size 1 process group and Megatron's parallel state (idempotent)."""
    import megatron_gdn.cpu
    from megatron_gdn.testing.dist import free_port, init_megatron

    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        if not cuda:
            megatron_gdn.cpu.enable()
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo", rank=0, world_size=1,
            init_method=f"tcp://127.0.0.1:{free_port()}")
        init_megatron(seed=seed)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def build_model(yaml_text: str, source: str, seed: int):
    """(model, HybridModel) from a YAML model document."""
    import yaml

    from megatron_gdn.hybrid import yaml_loader as yl

    hm = yl.parse(yaml.safe_load(yaml_text), source)
    device = setup_megatron(seed)
    torch.manual_seed(seed)
    config = yl.transformer_config(hm, use_cpu_initialization=device.type == "cpu")
    model = yl.build_gpt_model(hm, config).to(device)
    return model, hm


def _logits(model, tokens_nt: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens_nt.shape[1], device=tokens_nt.device).expand_as(tokens_nt)
    return model(tokens_nt, position_ids, None)


def model_predictor(model, device, chunk: int = 64):
    """recall_eval predictor: argmax of the logits, `chunk` samples at a time."""
    @torch.no_grad()
    def predict(batch):
        model.eval()
        out = []
        for i in range(0, len(batch.tokens), chunk):
            tokens = torch.from_numpy(batch.tokens[i:i + chunk]).to(device)
            out.append(_logits(model, tokens).argmax(-1).cpu().numpy())
        model.train()
        return np.concatenate(out)
    return predict


def checkpoint_predictor(directory: Path):
    """(predictor, meta) for a train_recall.py --out directory."""
    meta = json.loads((Path(directory) / "meta.json").read_text())
    model, _ = build_model(meta["yaml"], meta["config"], meta["seed"])
    device = next(model.parameters()).device
    model.load_state_dict(torch.load(Path(directory) / "model.pt", map_location=device))
    return model_predictor(model, device), meta


def _lr(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML model file")
    parser.add_argument("--task", default="mqar", choices=sorted(TASKS) + sorted(NIAH_PRESETS))
    parser.add_argument("--num-kv", type=int, default=8, help="mqar: key/value pairs")
    parser.add_argument("--seq-length", type=int, default=None, help="default: the YAML's seq_length")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="default: the YAML's vocab_size (the override is saved in meta.json's YAML)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=None,
                        help="default: 1x, 2x, 4x, 8x the training length")
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="fit the run into this many seconds of training: the step time is "
                             "measured over steps 10-40 and, where --steps would not fit, the "
                             "schedule is shortened to the steps that do (cosine to its end), "
                             "before warm-up ends where possible; training stops at the limit "
                             "in any case and the checkpoint is evaluated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    yaml_text = args.config.read_text()
    if args.vocab_size is not None:
        import yaml

        doc = yaml.safe_load(yaml_text)
        doc["model"]["vocab_size"] = args.vocab_size
        yaml_text = yaml.safe_dump(doc, sort_keys=False)
    model, hm = build_model(yaml_text, str(args.config), args.seed)
    device = next(model.parameters()).device
    vocab = hm.model["vocab_size"]
    seq = args.seq_length or hm.model["seq_length"]
    options = {"num_kv": args.num_kv} if args.task == "mqar" else {}
    eval_lengths = args.eval_lengths if args.eval_lengths is not None else [seq * f for f in (1, 2, 4, 8)]
    warmup = args.warmup if args.warmup is not None else args.steps // 10

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"name": hm.name, "config": str(args.config), "yaml": yaml_text, "task": args.task,
            "num_kv": args.num_kv if args.task == "mqar" else None, "vocab_size": vocab,
            "seq_length": seq, "seed": args.seed, "argv": sys.argv[1:] if argv is None else argv,
            "parameters": sum(p.numel() for p in model.parameters())}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    log = (args.out / "metrics.jsonl").open("w")
    start = time.time()
    model.train()
    steps = args.steps  # the schedule's length: shortened under --time-limit-s
    # --time-limit-s: the step time is measured over steps FIT_FROM..FIT_AT, after the first
    # compilations (in the GPU study a dozen runs start at once, and their first steps are slow)
    FIT_FROM, FIT_AT = 10, 40
    t_from = None
    step = -1
    for step in range(args.steps):
        if step >= steps:
            break
        if args.time_limit_s is not None:
            now = time.time() - start
            if step == FIT_FROM:
                t_from = now
            elif step == FIT_AT and t_from is not None:
                step_s = (now - t_from) / (FIT_AT - FIT_FROM)
                # 90% of the time left: a slower stretch later should not hit the hard stop
                fit = FIT_AT + int(0.9 * (args.time_limit_s - now) / step_s)
                if fit < steps:
                    steps = max(FIT_AT + 1, fit)
                    warmup = min(warmup, max(FIT_AT, steps // 10))  # steps before FIT_AT are done
                    print(json.dumps({"schedule": "shortened to fit --time-limit-s", "steps": steps,
                                      "step_s": round(step_s, 4)}), flush=True)
            if now >= args.time_limit_s:
                steps = step
                print(json.dumps({"stopped": "at --time-limit-s", "step": step}), flush=True)
                break
        batch = make_task(args.task, args.batch_size, seq, vocab, train_seed(args.seed, step), **options)
        tokens = torch.from_numpy(batch.tokens).to(device)
        labels = torch.from_numpy(batch.labels).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, args.lr, warmup)
        logits = _logits(model, tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_interval == 0 or step == steps - 1:
            with torch.no_grad():
                mask = labels != IGNORE
                acc = ((logits.argmax(-1) == labels) & mask).sum() / mask.sum()
            rec = {"step": step, "loss": loss.item(), "acc": acc.item(), "grad_norm": grad_norm.item(),
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - start, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
    log.close()
    trained = {"steps_planned": args.steps, "steps_done": min(steps, step + 1) if step >= 0 else 0,
               "train_s": round(time.time() - start, 1), "time_limit_s": args.time_limit_s}
    meta.update(trained)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    torch.save(model.state_dict(), args.out / "model.pt")
    if eval_lengths:
        results = evaluate_lengths(model_predictor(model, device), args.task, eval_lengths,
                                   args.eval_samples, vocab, seed=args.seed, **options)
        (args.out / "eval.json").write_text(json.dumps(
            {"task": args.task, "seed": args.seed, "samples": args.eval_samples, **trained,
             "results": results}, indent=1))
        print(format_table(results, f"{hm.name} on {args.task}"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
