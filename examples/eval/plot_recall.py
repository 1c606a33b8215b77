"""Plots of a recall study (summarize_recall.py's summary JSON) as PNG: accuracy against the
evaluation length, one line per model (mean over seeds, each seed as faint points), one panel
per summary given (e.g. the trained number of pairs and a harder re-scoring).

    python examples/eval/plot_recall.py benchmarks/logs/quality_cpu/summary.json \
        benchmarks/logs/quality_cpu/summary_kv8.json --titles "4 pairs" "8 pairs" \
        --out benchmarks/quality_cpu_mqar.png

--metric exact_match (default) or token_acc. The training length is marked where the runs
record it (--seq-length in their arguments).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional


def _train_length(model: dict) -> Optional[int]:
    argv = model["runs"][0].get("argv", [])
    return int(argv[argv.index("--seq-length") + 1]) if "--seq-length" in argv else None


def plot(summaries: List[dict], titles: List[str], out: Path, metric: str = "exact_match") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 4.2), squeeze=False)
    for ax, summary, title in zip(axes[0], summaries, titles):
        train_lengths = set()
        for name, model in summary["models"].items():
            lengths = sorted(int(t) for t in model["mean"])
            mean = [100 * model["mean"][str(t) if str(t) in model["mean"] else t][metric] for t in lengths]
            line, = ax.plot(lengths, mean, marker="o", label=f"{name} ({len(model['runs'])} seeds)")
            for run in model["runs"]:
                xs = sorted(int(t) for t in run["eval"])
                ys = [100 * run["eval"][str(t) if str(t) in run["eval"] else t][metric] for t in xs]
                ax.scatter(xs, ys, s=10, alpha=0.35, color=line.get_color())
            if _train_length(model):
                train_lengths.add(_train_length(model))
        for t in train_lengths:
            ax.axvline(t, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens)" + (", dotted: training length" if train_lengths else ""))
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_summary(spec: str) -> dict:
    """A summary from FILE.json, or the part KEY of FILE.json:KEY."""
    path, _, key = spec.partition(".json:")
    doc = json.loads(Path(path + ".json" if key else path).read_text())
    return doc[key] if key else doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summaries", nargs="+",
                   help="summary JSON files (one panel each), or FILE.json:KEY for one part of a "
                        "file (best_of.py's FILE.json:runs and FILE.json:rescored)")
    p.add_argument("--titles", nargs="*", default=None)
    p.add_argument("--metric", choices=("exact_match", "token_acc"), default="exact_match")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    titles = args.titles or [Path(s.split(".json:")[0]).stem for s in args.summaries]
    if len(titles) != len(args.summaries):
        raise SystemExit(f"{len(titles)} titles for {len(args.summaries)} summaries")
    print(plot([load_summary(s) for s in args.summaries], titles, args.out, args.metric))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
