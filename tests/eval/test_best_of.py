"""best_of.py: one row per model at its learning rate chosen at the training length only."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "eval"))

import best_of  # noqa: E402


def _row(em_by_length, tok=0.5):
    lengths = {t: {"token_acc": tok, "exact_match": em} for t, em in em_by_length.items()}
    return {"parameters": 10, "seeds": [0], "mean": lengths,
            "runs": [{"seed": 0, "final_loss_mean5": 1.0,
                      "eval": {t: dict(v, chance=0.1, samples=8) for t, v in lengths.items()}}]}


def test_choice_reads_only_the_training_length():
    # gdn: 3e-3 better at T=64 although worse at 512; attention: 1e-3 better at 64
    a = {"models": {"gdn": _row({64: 0.9, 512: 0.1}), "attention": _row({64: 0.1, 512: 0.9})}}
    b = {"models": {"gdn": _row({64: 0.8, 512: 1.0}), "attention": _row({64: 0.2, 512: 0.0})}}
    rows = best_of.rows_by_model([("3e-3", a), ("1e-3", b)])
    choice = best_of.choose(rows)
    assert choice == {"gdn": "3e-3", "attention": "1e-3"}
    picked = best_of.pick(rows, choice)
    assert list(picked["models"]) == ["gdn (lr 3e-3)", "attention (lr 1e-3)"]
    assert picked["models"]["attention (lr 1e-3)"]["mean"][512]["exact_match"] == 0.0


def test_ties_go_to_token_accuracy_then_the_first_given():
    a = {"models": {"m": _row({64: 0.5}, tok=0.6)}}
    b = {"models": {"m": _row({64: 0.5}, tok=0.7)}}
    assert best_of.choose(best_of.rows_by_model([("a", a), ("b", b)])) == {"m": "b"}
    c = {"models": {"m": _row({64: 0.5}, tok=0.7)}}
    assert best_of.choose(best_of.rows_by_model([("b", b), ("c", c)])) == {"m": "b"}


def test_rows_named_with_their_learning_rate(tmp_path):
    # one study with MODEL-lrX rows (gpu_study.py's folders): no label needed
    s = {"models": {"gdn-lr0.001": _row({128: 0.2}), "gdn-lr0.003": _row({128: 0.7})}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(s))  # lengths become strings in JSON: _parse turns them back
    out = tmp_path / "best.json"
    assert best_of.main(["--runs", str(path), "--rescored", str(path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["choice"] == {"gdn": "0.003"}
    assert list(result["rescored"]["models"]) == ["gdn (lr 0.003)"]
    with pytest.raises(ValueError, match="no learning rate"):
        best_of.rows_by_model([("", {"models": {"gdn": _row({128: 0.2})}})])
