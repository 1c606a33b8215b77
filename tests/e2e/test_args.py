"""pretrain_gdn.py's own flags: presets, the byte tokenizer translation, YAML shape flags, and
the errors raised before Megatron sees the command line (no processes)."""
import pytest

from helpers import ROOT
from megatron_gdn.training.args import PRESETS, UsageError, split_argv


def _value(argv, flag):
    """The value Megatron's argparse will see for `flag` (the last occurrence wins)."""
    idx = [i for i, a in enumerate(argv) if a == flag]
    return argv[idx[-1] + 1] if idx else None


def test_preset_user_flags_win_and_byte_tokenizer():
    opts = split_argv(["--preset", "cpu-tiny", "--out", "runs/x", "--train-iters", "7"],
                      has_cuda=False)
    argv = opts.megatron_argv
    assert _value(argv, "--train-iters") == "7"
    assert _value(argv, "--tokenizer-type") == "NullTokenizer"
    assert _value(argv, "--vocab-size") == "257"
    assert "ByteTokenizer" not in argv
    assert _value(argv, "--data-path") == "runs/x/data/stdlib_text_document"
    assert _value(argv, "--save") == "runs/x/checkpoints"
    assert "--use-cpu-initialization" in argv and "--preset" not in argv and "--out" not in argv


def test_no_save_and_explicit_data():
    argv = split_argv(["--preset", "cpu-tiny", "--out", "o", "--no-save", "--mock-data"],
                      has_cuda=False).megatron_argv
    assert "--save" not in argv and "--data-path" not in argv


def test_yaml_replaces_preset_shape():
    argv = split_argv(["--preset", "cpu-tiny", "--out", "o", "--model-yaml",
                       str(ROOT / "examples/configs/gdn_1.3b.yaml"), "--seq-length", "256"],
                      has_cuda=False).megatron_argv
    assert argv.count("--hidden-size") == 1 and _value(argv, "--hidden-size") == "2048"
    assert _value(argv, "--num-layers") == "21"
    assert _value(argv, "--linear-value-head-dim") == "512"
    assert _value(argv, "--seq-length") == "256"  # the command line wins over the file
    # a head count dividing the hidden size (the file's 6 GDN key heads do not)
    assert 2048 % int(_value(argv, "--num-attention-heads")) == 0


@pytest.mark.parametrize("argv, match", [
    (["--preset", "gpu-huge"], "--preset 'gpu-huge'"),
    (["--preset", "cpu-tiny"], "needs --out DIR"),
    (["--gdn-backend", "cuda"], "--gdn-backend 'cuda'"),
    (["--model-yaml", "nope.yaml"], "nope.yaml: cannot read the file"),
], ids=["preset", "preset-out", "backend", "yaml"])
def test_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        split_argv(argv, has_cuda=False)


def test_presets_are_complete_models():
    argv = PRESETS["cpu-tiny"]
    for flag in ("--num-layers", "--hidden-size", "--seq-length", "--train-iters", "--lr"):
        assert flag in argv
