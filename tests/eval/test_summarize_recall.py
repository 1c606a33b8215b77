"""summarize_recall.py: train_recall.py run folders -> per-seed and mean tables (no training here)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "eval"))

from summarize_recall import collect, markdown  # noqa: E402


def _fake_run(d: Path, seed: int, em: dict, losses):
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"seed": seed, "parameters": 1234, "config": "c.yaml", "argv": []}))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * i, "loss": x, "acc": 0.5, "elapsed_s": float(i)}) + "\n" for i, x in enumerate(losses)))
    (d / "eval.json").write_text(json.dumps({"results": {str(t): {
        "token_acc": v, "exact_match": v / 2, "chance": 0.1, "samples": 8} for t, v in em.items()}}))


def test_collect_means_and_table(tmp_path):
    _fake_run(tmp_path / "gdn" / "s0", 0, {64: 1.0, 128: 0.5}, [3.0, 2.0, 1.0])
    _fake_run(tmp_path / "gdn" / "s1", 1, {64: 0.5, 128: 0.25}, [3.0, 1.0])
    (tmp_path / "gdn" / "s2").mkdir()  # unfinished: no eval.json
    (tmp_path / "gdn" / "s0.log").write_text("a log next to the run folders is not a run\n")
    s = collect(tmp_path)
    g = s["models"]["gdn"]
    assert g["seeds"] == [0, 1] and s["incomplete"] == ["gdn/s2"]
    assert g["mean"][64] == {"token_acc": 0.75, "exact_match": 0.375}
    assert g["runs"][0]["final_loss"] == 1.0 and g["runs"][0]["final_loss_mean5"] == 2.0
    assert g["runs"][0]["steps"] == 21 and g["runs"][0]["first_step_train_acc90"] is None
    table = markdown(s, "token_acc")
    assert "| gdn | 1,234 | 2 | 21/11 | 2.000 | **75.0** (100.0/50.0) | **37.5** (50.0/25.0) |" in table
    json.dumps(s)  # serialisable
    # a re-scoring in RUN/kv8/eval.json replaces the evaluation, training numbers stay
    (tmp_path / "gdn" / "s0" / "kv8").mkdir()
    (tmp_path / "gdn" / "s0" / "kv8" / "eval.json").write_text(json.dumps({"results": {"64": {
        "token_acc": 0.2, "exact_match": 0.1, "chance": 0.1, "samples": 8}}}))
    s8 = collect(tmp_path, ["gdn"], eval_subdir="kv8")
    assert s8["models"]["gdn"]["seeds"] == [0] and s8["models"]["gdn"]["mean"][64]["token_acc"] == 0.2
    assert s8["models"]["gdn"]["runs"][0]["final_loss"] == 1.0
