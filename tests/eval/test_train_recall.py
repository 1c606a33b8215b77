"""train_recall.py: a tiny GDN GPTModel (Megatron, one gloo process) trains on MQAR on CPU and
its loss falls; the ablation configs switch the GDN layer's own options off."""
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


ABLATED = {"deltanet": ("decay",), "gdn_no_conv": ("short_conv",), "gdn_no_gate": ("output_gate",)}


@pytest.mark.parametrize("name", sorted(ABLATED))
def test_ablation_configs_use_the_layer_options(name):
    """The ablation configs are gdn.yaml with exactly their GDN option(s) off (the layer's own
    keywords, no freezing in the driver), and the parameter count drops accordingly."""
    import yaml

    from megatron_gdn.hybrid import yaml_loader as yl

    configs = EVAL / "configs"
    raw = yaml.safe_load((configs / f"{name}.yaml").read_text())
    base = yaml.safe_load((configs / "gdn.yaml").read_text())
    off = ABLATED[name]
    assert {k: v for k, v in raw["gdn"].items() if k not in off} == base["gdn"]
    assert all(raw["gdn"][k] is False for k in off)
    assert {k: v for k, v in raw.items() if k not in ("gdn", "name")} == \
        {k: v for k, v in base.items() if k not in ("gdn", "name")}
    hm = yl.load(configs / f"{name}.yaml")
    plan = next(p for p in hm.layers if p.mixer == "gdn")
    options = dict(plan.options)
    for key, option in (("decay", "use_decay"), ("short_conv", "use_short_conv"), ("output_gate", "use_output_gate")):
        assert options[option] is (key not in off), (key, options)
    assert yl.count_parameters(hm)["total"] < yl.count_parameters(yl.load(configs / "gdn.yaml"))["total"]


def test_time_limit_shortens_the_schedule(tmp_path):
    """--time-limit-s: a run of far more steps than fit is cut to the steps that do, with the
    cosine schedule ending at the new last step, and the checkpoint is still evaluated."""
    cmd = [sys.executable, str(EVAL / "train_recall.py"), "--config", str(EVAL / "configs" / "tiny_gdn.yaml"),
           "--task", "mqar", "--num-kv", "4", "--seq-length", "32", "--steps", "100000",
           "--batch-size", "4", "--log-interval", "1", "--eval-lengths", "32", "--eval-samples", "8",
           "--num-threads", "1", "--time-limit-s", "6", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shortened to fit --time-limit-s" in out.stdout
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["steps_planned"] == 100000 and 41 <= ev["steps_done"] < 100000
    assert ev["time_limit_s"] == 6 and ev["train_s"] < 25
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == ev["steps_done"] - 1
    # the schedule was rescaled, not cut: the last steps' learning rate is near the end of the cosine
    assert records[-1]["lr"] < 0.1 * max(r["lr"] for r in records)
    assert json.loads((tmp_path / "meta.json").read_text())["steps_done"] == ev["steps_done"]
