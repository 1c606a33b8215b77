"""One row per model from runs at several learning rates: each model's learning rate is the one
with the higher mean exact match at the training length (the shortest evaluated length; ties go
to the higher token accuracy, then to the first given); the other lengths and any re-scoring of
the same checkpoints (e.g. on more pairs) are then read for that learning rate only, so the
choice never looks at the extrapolation or re-scoring columns it reports.

    python examples/eval/best_of.py --runs 3e-3=runs/cpu_mqar/summary.json \\
        1e-3=runs/cpu_mqar_lr1e-3/summary.json \\
        --rescored 3e-3=runs/cpu_mqar/summary_kv8.json 1e-3=runs/cpu_mqar_lr1e-3/summary_kv8.json \\
        --out benchmarks/logs/quality_cpu/best_lr.json

A summary is summarize_recall.py's JSON. Its rows are models, or MODEL-lrX rows of one study
with several learning rates (gpu_study.py's run folders): there the label is X and the file
needs no LABEL=.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple

from summarize_recall import markdown

__all__ = ["rows_by_model", "choose", "pick"]


def rows_by_model(summaries: List[Tuple[str, dict]]) -> Dict[str, Dict[str, dict]]:
    """{model: {label: row}} from (label, summary) pairs; a MODEL-lrX row takes the label X."""
    out: Dict[str, Dict[str, dict]] = {}
    for label, summary in summaries:
        for name, row in summary["models"].items():
            model, row_label = name.rsplit("-lr", 1) if "-lr" in name else (name, label)
            if not row_label:
                raise ValueError(f"row {name!r} has no learning rate: give the file as LABEL=PATH")
            if row_label in out.setdefault(model, {}):
                raise ValueError(f"two rows for {model} at {row_label}")
            out[model][row_label] = row
    return out


def choose(rows: Dict[str, Dict[str, dict]]) -> Dict[str, str]:
    """{model: label}: the higher mean exact match at the shortest length, then token accuracy."""
    choice = {}
    for model, by_label in rows.items():
        def score(label):
            mean = by_label[label]["mean"]
            first = mean[min(mean, key=int)]
            return first["exact_match"], first["token_acc"]
        best = max(by_label, key=score)  # max keeps the first of equal scores
        choice[model] = best
    return choice


def pick(rows: Dict[str, Dict[str, dict]], choice: Dict[str, str]) -> dict:
    """A summary with one row per model, named 'MODEL (lr LABEL)'."""
    models = {f"{m} (lr {choice[m]})": rows[m][choice[m]] for m in choice if choice[m] in rows.get(m, {})}
    return {"models": models, "incomplete": []}


def _parse(specs: List[str]) -> List[Tuple[str, dict]]:
    out = []
    for spec in specs:
        label, path = spec.split("=", 1) if "=" in spec else ("", spec)
        summary = json.loads(Path(path).read_text())
        # JSON object keys are strings: lengths back to ints as summarize_recall writes them
        for row in summary["models"].values():
            row["mean"] = {int(k): v for k, v in row["mean"].items()}
            for run in row["runs"]:
                run["eval"] = {int(k): v for k, v in run["eval"].items()}
        out.append((label, summary))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="[LABEL=]summary.json of the trained task")
    p.add_argument("--rescored", nargs="*", default=[], help="[LABEL=]summary.json of a re-scoring")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = rows_by_model(_parse(args.runs))
    choice = choose(rows)
    result = {"choice": choice, "runs": pick(rows, choice)}
    if args.rescored:
        result["rescored"] = pick(rows_by_model(_parse(args.rescored)), choice)
    for part in ("runs", "rescored"):
        if part in result:
            for key in ("exact_match", "token_acc"):
                print(f"\n{part}: {key} (%), mean over seeds (per seed), each model at its chosen lr:\n")
                print(markdown(result[part], key))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
