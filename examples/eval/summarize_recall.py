"""Collect train_recall.py runs (ROOT/MODEL/sSEED) into one compact JSON and markdown tables.

    python examples/eval/summarize_recall.py runs/cpu_mqar --out benchmarks/logs/quality_cpu/summary.json

Per model: parameter count, and per seed the final training loss (last logged step and the mean
of the last 5 logged steps), the steps and wall time, the first logged step with 90% training
accuracy, and the evaluation (token accuracy, exact
match per length); then the mean over the seeds that finished. Runs without eval.json are
skipped (listed under "incomplete").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["collect", "mean_over_seeds", "markdown"]


def _run(directory: Path, eval_subdir: str = "") -> Optional[dict]:
    meta_path, eval_path = directory / "meta.json", directory / eval_subdir / "eval.json"
    if not (meta_path.exists() and eval_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    log = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
    tail = log[-5:]
    results = json.loads(eval_path.read_text())["results"]
    return {
        "seed": meta["seed"], "parameters": meta["parameters"], "config": meta["config"],
        "argv": meta["argv"], "steps": log[-1]["step"] + 1, "train_s": log[-1]["elapsed_s"],
        "final_loss": log[-1]["loss"], "final_loss_mean5": sum(r["loss"] for r in tail) / len(tail),
        "final_train_acc_mean5": sum(r["acc"] for r in tail) / len(tail),
        # first logged step whose batch accuracy at the answers reached 90% (None: never)
        "first_step_train_acc90": next((r["step"] for r in log if r["acc"] >= 0.9), None),
        "eval": {int(k): {"token_acc": v["token_acc"], "exact_match": v["exact_match"],
                          "chance": v["chance"], "samples": v["samples"]} for k, v in results.items()},
    }


def mean_over_seeds(runs: List[dict]) -> Dict[int, Dict[str, float]]:
    """Mean token accuracy and exact match per length over the runs (lengths common to all)."""
    lengths = sorted(set.intersection(*(set(r["eval"]) for r in runs))) if runs else []
    return {t: {key: sum(r["eval"][t][key] for r in runs) / len(runs) for key in ("token_acc", "exact_match")}
            for t in lengths}


def collect(root: Path, models: Optional[List[str]] = None, eval_subdir: str = "") -> dict:
    """eval_subdir: read each run's evaluation from RUN/eval_subdir/eval.json (a recall_eval.py
    --checkpoint RUN --out RUN/eval_subdir re-scoring, e.g. on more pairs)."""
    root = Path(root)
    names = models or sorted(p.name for p in root.iterdir() if p.is_dir() and any(d.is_dir() for d in p.glob("s*")))
    out, incomplete = {}, []
    for name in names:
        runs = []
        for d in sorted(d for d in (root / name).glob("s*") if d.is_dir()):
            run = _run(d, eval_subdir)
            if run is None:
                incomplete.append(str(d.relative_to(root)))
            else:
                runs.append(run)
        if runs:
            out[name] = {"parameters": runs[0]["parameters"], "seeds": [r["seed"] for r in runs],
                         "runs": runs, "mean": mean_over_seeds(runs)}
    return {"models": out, "incomplete": incomplete}


def markdown(summary: dict, key: str = "exact_match") -> str:
    """One row per model: the mean over seeds per length, then the per-seed values in brackets."""
    models = summary["models"]
    lengths = sorted({t for m in models.values() for t in m["mean"]})
    head = "| model | params | seeds | steps | final loss (mean) | " + " | ".join(f"T={t}" for t in lengths) + " |"
    lines = [head, "|---" * (5 + len(lengths)) + "|"]
    for name, m in models.items():
        loss = sum(r["final_loss_mean5"] for r in m["runs"]) / len(m["runs"])
        # a run shortened to fit its time (train_recall.py --time-limit-s) shows its own count
        counts = [r.get("steps") for r in m["runs"]]
        steps = ("-" if None in counts else f"{counts[0]:,}" if len(set(counts)) == 1
                 else "/".join(f"{c:,}" for c in counts))
        cells = []
        for t in lengths:
            if t not in m["mean"]:
                cells.append("-")
                continue
            per_seed = "/".join(f"{100 * r['eval'][t][key]:.1f}" for r in m["runs"])
            cells.append(f"**{100 * m['mean'][t][key]:.1f}** ({per_seed})")
        lines.append(f"| {name} | {m['parameters']:,} | {len(m['runs'])} | {steps} | {loss:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory with MODEL/sSEED run folders")
    parser.add_argument("--models", nargs="*", default=None, help="order of the rows (default: sorted)")
    parser.add_argument("--eval-subdir", default="", help="read RUN/SUBDIR/eval.json instead of RUN/eval.json")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args(argv)
    summary = collect(args.root, args.models, args.eval_subdir)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    for key in ("exact_match", "token_acc"):
        print(f"\n{key} (%), mean over seeds (per seed):\n")
        print(markdown(summary, key))
    if summary["incomplete"]:
        print("\nincomplete:", ", ".join(summary["incomplete"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
