"""examples/pretrain_gdn_deepspeed.py without a training run: the message when DeepSpeed is
missing and the refused flags (these run whether or not deepspeed is installed)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
YAML = str(ROOT / "examples" / "configs" / "tiny_gdn.yaml")


def _example():
    spec = importlib.util.spec_from_file_location(
        "pretrain_gdn_deepspeed", ROOT / "examples" / "pretrain_gdn_deepspeed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_deepspeed_message(monkeypatch):
    ex = _example()
    # None in sys.modules makes `import deepspeed` raise ImportError, installed or not
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ImportError, match=r"DeepSpeed is not installed.*\[deepspeed\]"):
        ex.train(ex.parse_args(["--model-yaml", YAML]))


def test_missing_deepspeed_exits_with_message(monkeypatch, capsys):
    ex = _example()
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(SystemExit) as exc:
        ex.main(["--model-yaml", YAML])
    assert exc.value.code == 2
    assert "DeepSpeed is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--sequence-parallel"], "--sequence-parallel"),
    (["--zero-stage", "4"], "--zero-stage 4"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size"),
], ids=["sp", "stage4", "tp0"])
def test_bad_flags_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        _example().parse_args(["--model-yaml", YAML] + argv)


def test_bad_config_path_refused(tmp_path):
    ex = _example()
    args = ex.parse_args(["--model-yaml", YAML, "--ds-config", str(tmp_path / "none.json")])
    with pytest.raises(ValueError, match="--ds-config"):
        ex.load_ds_config(args)


def test_missing_data_path_refused(tmp_path):
    with pytest.raises(ValueError, match="--data-path"):
        _example().TokenStream(str(tmp_path / "nothing"), vocab=128)
