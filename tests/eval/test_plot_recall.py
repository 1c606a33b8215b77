"""examples/eval/plot_recall.py: a summary in summarize_recall.py's format becomes a PNG with
one panel per summary; mismatched titles are refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[2]


def _summary(scores):
    runs = [{"seed": s, "argv": ["--seq-length", "64"],
             "eval": {str(t): {"exact_match": v, "token_acc": v} for t, v in zip((64, 128), vals)}}
            for s, vals in enumerate(scores)]
    mean = {str(t): {"exact_match": sum(r["eval"][str(t)]["exact_match"] for r in runs) / len(runs),
                     "token_acc": 0.0} for t in (64, 128)}
    return {"models": {"gdn": {"runs": runs, "mean": mean}}, "incomplete": []}


def test_png_written_and_titles_checked(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_summary([(1.0, 0.5), (0.8, 0.3)])))
    b.write_text(json.dumps(_summary([(0.2, 0.1)])))
    out = tmp_path / "plot.png"
    res = subprocess.run([sys.executable, str(ROOT / "examples/eval/plot_recall.py"), str(a), str(b),
                          "--titles", "A", "B", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    bad = subprocess.run([sys.executable, str(ROOT / "examples/eval/plot_recall.py"), str(a), str(b),
                          "--titles", "only one", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "titles" in bad.stderr


def test_part_of_a_file(tmp_path):
    """FILE.json:KEY plots one part of a file (best_of.py writes {"runs": ..., "rescored": ...})."""
    sys.path.insert(0, str(ROOT / "examples" / "eval"))
    from plot_recall import load_summary

    both = tmp_path / "best.json"
    both.write_text(json.dumps({"choice": {}, "runs": _summary([(1.0, 0.5)]),
                                "rescored": _summary([(0.2, 0.1)])}))
    assert load_summary(f"{both}:rescored")["models"]["gdn"]["runs"][0]["eval"]["64"]["exact_match"] == 0.2
    out = tmp_path / "plot.png"
    res = subprocess.run([sys.executable, str(ROOT / "examples/eval/plot_recall.py"), f"{both}:runs",
                          f"{both}:rescored", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
