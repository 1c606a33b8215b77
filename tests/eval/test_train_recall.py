"""train_recall.py: a tiny GDN GPTModel (Megatron, one gloo process) trains on MQAR on CPU and
its loss falls; the ablation section of an eval config is validated."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "examples" / "eval"
sys.path.insert(0, str(EVAL))


def test_tiny_gdn_loss_falls_on_mqar(tmp_path):
    cmd = [sys.executable, str(EVAL / "train_recall.py"), "--config", str(EVAL / "configs" / "tiny_gdn.yaml"),
           "--task", "mqar", "--num-kv", "4", "--steps", "12", "--batch-size", "16", "--lr", "1e-2",
           "--warmup", "0", "--log-interval", "1", "--eval-lengths", "32", "--eval-samples", "16",
           "--num-threads", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.1, losses
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert set(results) == {"32"} and 0.0 <= results["32"]["token_acc"] <= 1.0
    assert (tmp_path / "model.pt").exists()


def test_ablation_section_checked():
    from train_recall import ABLATIONS, split_ablation

    raw, flags = split_ablation({"name": "x", "ablation": {"gdn_decay": False}}, "f.yaml")
    assert "ablation" not in raw and flags == {**ABLATIONS, "gdn_decay": False}
    with pytest.raises(ValueError, match="ablation.output_gate: unknown"):
        split_ablation({"ablation": {"output_gate": False}}, "f.yaml")
    with pytest.raises(ValueError, match="ablation.short_conv: must be true or false"):
        split_ablation({"ablation": {"short_conv": "no"}}, "f.yaml")
