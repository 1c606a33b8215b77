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


def test_keep_chunk_states_flag_is_ours():
    """--gdn-keep-chunk-states is read here (the script turns it into MEGATRON_GDN_KEEP_STATES
    for the kernels), not handed to Megatron, whose parser would reject it."""
    plain = split_argv(["--preset", "cpu-tiny", "--out", "o"], has_cuda=False)
    kept = split_argv(["--preset", "cpu-tiny", "--out", "o", "--gdn-keep-chunk-states"],
                      has_cuda=False)
    assert not plain.keep_chunk_states and kept.keep_chunk_states
    assert "--gdn-keep-chunk-states" not in kept.megatron_argv
    assert kept.megatron_argv == plain.megatron_argv


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


def test_gpu_fallback_flags_without_transformer_engine(monkeypatch):
    """A GPU machine without TE: local layers, no RoPE fusion (Megatron's argument check asks
    for TE even for models without RoPE: the first GPU run of the 1.3B preset stopped there),
    no gradient-accumulation fusion; what the user gave stays."""
    import importlib.util

    from megatron_gdn.training.args import gpu_fallback_flags

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformer_engine", "apex",
                                                          "fused_weight_gradient_mlp_cuda")
                        else real(name, *a))
    from megatron_gdn.training import wgrad_fusion

    # the gradient-accumulation fusion stays on where our stand-in for Apex's extension works
    monkeypatch.setattr(wgrad_fusion, "usable_here", lambda: True)
    assert "--no-gradient-accumulation-fusion" not in gpu_fallback_flags([])
    # ... but not under torch FSDP2, which Megatron's argument checks refuse it with
    assert "--no-gradient-accumulation-fusion" in gpu_fallback_flags(["--use-torch-fsdp2"])
    monkeypatch.setattr(wgrad_fusion, "usable_here", lambda: False)
    flags = gpu_fallback_flags([])
    assert _value(flags, "--transformer-impl") == "local"
    assert "--no-rope-fusion" in flags and "--no-gradient-accumulation-fusion" in flags
    # pretrain_gpt.py on the GPU: "persist_layer_norm not supported by torch LayerNorm"
    assert "--no-persist-layer-norm" in flags and "--no-masked-softmax-fusion" in flags
    flags = gpu_fallback_flags(["--transformer-impl", "transformer_engine", "--no-rope-fusion"])
    assert "--transformer-impl" not in flags and "--no-rope-fusion" not in flags
    # with GPU: split_argv appends them after the user's flags
    argv = split_argv(["--model-yaml", str(ROOT / "examples/configs/gdn_1.3b.yaml")],
                      has_cuda=True).megatron_argv
    assert "--no-rope-fusion" in argv and "--use-cpu-initialization" not in argv


def test_dataset_helpers_from_the_wheel():
    """Megatron's _compile_dependencies runs `make` in the wheel's datasets folder, which has no
    Makefile (pretrain_gpt.py stopped there on the GPU): patched to use the shipped helpers_cpp,
    once, without a process group."""
    import megatron_gdn.cpu
    from megatron.training import initialize

    megatron_gdn.cpu.use_shipped_dataset_helpers()
    patched = initialize._compile_dependencies
    megatron_gdn.cpu.use_shipped_dataset_helpers()
    assert initialize._compile_dependencies is patched and patched._megatron_gdn
    patched()  # helpers_cpp imports: no make, no barrier without a process group


def test_yaml_model_takes_megatron_fusions_from_the_command_line(monkeypatch):
    """With --model-yaml the shape comes from the file, but how the model runs comes from the
    command line: Megatron's fusions (on by default on a GPU, off by the CPU flags) reach the
    config, as do the other run-time fields; every such field is a TransformerConfig field."""
    import dataclasses

    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training import argument_utils

    from megatron_gdn.hybrid import yaml_loader
    from megatron_gdn.training import model

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(model.RUNTIME_FIELDS) <= names, set(model.RUNTIME_FIELDS) - names
    hm = yaml_loader.load(ROOT / "examples/configs/gdn_1.3b.yaml")
    for fused in (True, False):
        cmdline = TransformerConfig(
            num_layers=hm.num_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            bias_activation_fusion=fused, bias_dropout_fusion=fused)
        monkeypatch.setattr(argument_utils, "core_transformer_config_from_args", lambda args: cmdline)
        model.set_model_source("local", hm)
        try:
            config = model._config_from_args(None)
        finally:
            model.set_model_source("local", None)
        assert config.hidden_size == 2048 and config.linear_value_head_dim == 512  # the file's
        assert config.bias_activation_fusion is fused and config.bias_dropout_fusion is fused
