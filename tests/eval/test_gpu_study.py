"""examples/eval/gpu_study.py, the GPU recall study's job queue, run on the CPU with tiny
settings: every run trains and is scored, a finished run is skipped on the next call, the
budget stops new runs, and the tables are written."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "eval" / "gpu_study.py"
TINY = ["--gpus", "0", "--slots-per-gpu", "2", "--seeds", "0", "--steps", "2",
        "--eval-samples", "4", "--eval-lengths", "96", "--seq-length", "96", "--batch-size", "2"]


def _run(out, *extra):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY, *extra],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    return result, json.loads((out / "queue.json").read_text())


def test_queue_trains_scores_resumes_and_stops_at_the_budget(tmp_path):
    result, queue = _run(tmp_path, "--models", "gdn", "deltanet")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert sorted(r["run"] for r in queue) == ["mqar/deltanet/s0", "mqar/gdn/s0"]
    assert all(r["rc"] == 0 for r in queue), queue
    for model in ("gdn", "deltanet"):
        ev = json.loads((tmp_path / "mqar" / model / "s0" / "eval.json").read_text())
        assert set(ev["results"]) == {"96"}
    summary = json.loads((tmp_path / "mqar" / "summary.json").read_text())
    assert "gdn" in json.dumps(summary) and "deltanet" in json.dumps(summary)
    assert (tmp_path / "mqar" / "mqar.png").stat().st_size > 5000  # matplotlib: a dev extra
    # a second call skips both; a third with a zero budget starts nothing new
    _, again = _run(tmp_path, "--models", "gdn", "deltanet")
    assert all(r.get("skipped") == "done before" for r in again), again
    _, cut = _run(tmp_path, "--models", "gdn", "mamba2", "--budget-s", "0")
    assert {r["run"]: r.get("skipped") for r in cut} == {
        "mqar/gdn/s0": "done before", "mqar/mamba2/s0": "budget"}
