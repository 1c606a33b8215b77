"""Whole-model check for the recall study: one MQAR batch through an eval model (the study's
YAML, fp32, the study's vocabulary), loss and every parameter gradient with our Triton kernels
against the same model on the pure-torch kernel paths (megatron_gdn.kernels' reference
implementations, themselves tested against float64 recurrences). Asks whether a model that does
not learn on the GPU (the Mamba2 rows of benchmarks/QUALITY.md) is computing the wrong gradient.

    python examples/eval/check_model_grads.py --models mamba2 gdn_h2 gdn --out DIR

Writes DIR/model_grads.json: per model the loss both ways and the worst relative error over the
parameters (norm of the difference over the norm of the torch-path gradient).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recall_tasks import IGNORE, make_task  # noqa: E402
from train_recall import _logits, build_model  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    logits = _logits(model, tokens)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mamba2", "gdn_h2", "gdn"])
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--num-kv", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import yaml

    from megatron_gdn.kernels.utils import force_backend

    results = {}
    for name in args.models:
        doc = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        doc["model"]["vocab_size"] = args.vocab_size
        model, _ = build_model(yaml.safe_dump(doc), name, seed=0)
        device = next(model.parameters()).device
        batch = make_task("mqar", args.batch_size, args.seq_length, args.vocab_size, 7, num_kv=args.num_kv)
        tokens = torch.from_numpy(batch.tokens).to(device)
        labels = torch.from_numpy(batch.labels).to(device)
        loss, g = grads(model, tokens, labels)
        with force_backend("torch"):
            ref_loss, ref = grads(model, tokens, labels)
        errors = {n: ((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        results[name] = {"device": str(device), "loss_triton": loss, "loss_torch": ref_loss,
                         "params_compared": len(ref), "missing": sorted(set(ref) - set(g)),
                         "worst_rel_err": worst, "max_rel_err": worst[0][1] if worst else None}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_grads.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
