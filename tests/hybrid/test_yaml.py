"""The YAML model format: presets load and report parameter counts, invalid files give messages
that name the file, the place and the value, layer strings expand as documented, and the
analytic count equals the parameters of the built GPTModel (tiny presets, one gloo process)."""
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gdn.hybrid import yaml_loader as yl
from megatron_gdn.testing.dist import destroy_megatron, init_megatron, run_distributed

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
# rough sizes the presets are meant to have (billions); the count is analytic, see below
EXPECTED_BILLIONS = {"gdn_1.3b": (1.2, 1.45), "gdn_h1_1.3b": (1.2, 1.45), "gdn_h2_1.3b": (1.2, 1.45),
                     "qwen3_next_style": (1.5, 3.0)}


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    for name in ("gdn_1.3b", "gdn_h1_1.3b", "gdn_h2_1.3b", "qwen3_next_style", "tiny_gdn",
                 "tiny_gdn_h1", "tiny_gdn_h2", "tiny_qwen3_next"):
        assert name in names, f"preset {name}.yaml missing from examples/configs"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_counts(path):
    hm = yl.load(path)
    counts = yl.count_parameters(hm)
    print(f"{hm.name}: {counts['total']:,} parameters, layers: {hm.pattern()}")
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    if hm.name in EXPECTED_BILLIONS:
        lo, hi = EXPECTED_BILLIONS[hm.name]
        assert lo <= counts["total"] / 1e9 <= hi, counts


def test_h1_alternates_and_h2_orders_mixers():
    h1 = yl.load(CONFIGS / "gdn_h1_1.3b.yaml")
    assert [p.mixer for p in h1.layers[:4]] == ["gdn", "swa", "gdn", "swa"]
    assert all(p.ffn == "mlp" for p in h1.layers)
    assert {p.option("window") for p in h1.layers if p.mixer == "swa"} == {2048}
    h2 = yl.load(CONFIGS / "gdn_h2_1.3b.yaml")
    assert [p.mixer for p in h2.layers[:6]] == ["mamba2", "gdn", "swa"] * 2
    q = yl.load(CONFIGS / "qwen3_next_style.yaml")
    assert [p.mixer for p in q.layers[:4]] == ["gdn", "gdn", "gdn", "attention"]
    assert all(p.ffn == "moe" for p in q.layers)


def test_gdn_count_by_hand():
    """tiny_gdn written out: hidden 64, vocab 128, 2 x [gdn (H=2, HV=4, K=V=16, conv 4), mlp 128]."""
    hm = yl.load(CONFIGS / "tiny_gdn.yaml")
    h, H, HV, K, V, W, F = 64, 2, 4, 16, 16, 4, 128
    gdn = h * (2 * H * K + 2 * HV * V + 2 * HV) + (2 * H * K + HV * V) * W + 2 * HV + V + HV * V * h
    mlp = 3 * h * F
    layer = gdn + mlp + 2 * h
    assert yl.count_parameters(hm)["total"] == 2 * layer + 2 * 128 * h + h


@pytest.mark.parametrize("text,expected", [
    ("gdn", ["gdn"]),
    ("2 x [gdn, mlp]", ["gdn", "mlp"] * 2),
    ("2 x [gdn, mlp], swa, 2 x mlp", ["gdn", "mlp", "gdn", "mlp", "swa", "mlp", "mlp"]),
    ("2 x [gdn, 2 x [swa, mlp]]", ["gdn", "swa", "mlp", "swa", "mlp"] * 2),
    ("[gdn, moe]", ["gdn", "moe"]),
    ("3*[gdn]", ["gdn"] * 3),
])
def test_layer_strings(text, expected):
    assert [name for name, _ in yl.parse_layers(text)] == expected


def test_pairing_into_megatron_layers():
    base = {"model": {"hidden_size": 64, "vocab_size": 128, "seq_length": 32},
            "gdn": {"num_key_heads": 2, "key_head_dim": 16},
            "attention": {"num_heads": 4}, "swa": {"window": 4}, "mlp": {"ffn_hidden_size": 32}}
    hm = yl.parse(dict(base, layers=["gdn, swa, mlp, mlp", {"swa": {"window": 3}}]), "t.yaml")
    plans = [(p.mixer, p.ffn) for p in hm.layers]
    assert plans == [("gdn", None), ("swa", "mlp"), (None, "mlp"), ("swa", None)]
    assert hm.layers[-1].option("window") == 3
    assert hm.layers[1].option("window") == 4


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_megatron_activation_fusion_follows_megatron_rules(activation):
    """Megatron's fusion flag reaches the config (pretrain_gdn.py passes it from the command
    line); the gelu fusion is a bias-gelu fusion, so without linear biases it is off, as
    Megatron's own arguments do (TransformerConfig would refuse it)."""
    hm = yl.parse(dict(_base(), mlp={"ffn_hidden_size": 128, "activation": activation}), "t.yaml")
    config = yl.transformer_config(hm, bias_activation_fusion=True)
    assert config.bias_activation_fusion is (activation == "swiglu")
    assert yl.transformer_config(hm).bias_activation_fusion is False  # the default: none


def _base():
    return {
        "model": {"hidden_size": 64, "vocab_size": 128, "seq_length": 32},
        "layers": "2 x [gdn, mlp, swa, mlp]",
        "gdn": {"num_key_heads": 2, "num_value_heads": 4, "key_head_dim": 16},
        "attention": {"num_heads": 4, "num_kv_heads": 2},
        "swa": {"window": 8},
        "mlp": {"ffn_hidden_size": 128},
    }


def _with(path, value):
    raw = _base()
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


_DELETE = object()
INVALID = [
    # (change, expected message fragment)
    ((("layers",), "2 x [gdn, mlp, lstm]"), "bad.yaml: layers[2]: unknown layer type 'lstm'"),
    ((("layers",), "2 x [gdn, mlp"), "bad.yaml: layers entry 0: missing ']'"),
    ((("layers",), "0 x gdn"), "repeat count must be >= 1"),
    ((("layers",), ["gdn", {"gdn": {"window": 3}}]), "bad.yaml: layers[1] (gdn).window: not a per-layer option"),
    ((("layers",), ["mlp", {"swa": {"window": 0}}]), "bad.yaml: layers[1] (swa).window: must be a positive integer, got 0"),
    ((("layers",), []), "bad.yaml: layers: expected a non-empty string or list"),
    ((("gdn", "num_key_heads"), -2), "bad.yaml: gdn.num_key_heads: must be a positive integer, got -2"),
    ((("gdn", "num_value_heads"), 3), "bad.yaml: gdn.num_value_heads: 3 is not a multiple of gdn.num_key_heads (2)"),
    ((("gdn", "key_head_dim"), 512), "bad.yaml: gdn.key_head_dim: 512 > 256"),
    ((("gdn", "conv_kernel"), 1), "bad.yaml: gdn.conv_kernel: 1 outside"),
    ((("gdn", "heads"), 2), "bad.yaml: gdn.heads: unknown field"),
    ((("gdn", "decay"), "no"), "bad.yaml: gdn.decay: must be true or false, got 'no'"),
    ((("gdn", "output_gate"), 0), "bad.yaml: gdn.output_gate: must be true or false, got 0"),
    ((("attention", "num_kv_heads"), 3), "bad.yaml: attention.num_kv_heads: 3 does not divide attention.num_heads (4)"),
    ((("attention", "num_heads"), 6), "bad.yaml: attention.head_dim: not given and hidden_size 64 is not divisible"),
    ((("attention", "gated"), "yes"), "bad.yaml: attention.gated: must be true or false, got 'yes'"),
    ((("swa",), _DELETE), "bad.yaml: swa: section missing (needs window)"),
    ((("mlp", "activation"), "relu"), "bad.yaml: mlp.activation: must be one of ['swiglu', 'gelu'], got 'relu'"),
    ((("model", "hidden_size"), _DELETE), "bad.yaml: model.hidden_size: required field missing"),
    ((("model", "normalization"), "BatchNorm"), "bad.yaml: model.normalization: must be one of"),
    ((("model", "rope_fraction"), 1.5), "bad.yaml: model.rope_fraction: must be a number in (0, 1], got 1.5"),
    ((("model", "rope_fraction"), 0.3), "bad.yaml: model.rope_fraction: 0.3 x attention.head_dim 16"),
    ((("moe_layers",), 3), "bad.yaml: moe_layers: unknown top-level field"),
]


@pytest.mark.parametrize("change,message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_documents(change, message):
    path, value = change
    with pytest.raises(yl.HybridConfigError) as info:
        yl.parse(_with(path, value), "bad.yaml")
    assert message in str(info.value), str(info.value)


def test_invalid_files(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(yl.HybridConfigError, match="broken.yaml: not valid YAML"):
        yl.load(bad)
    moe = tmp_path / "moe.yaml"
    moe.write_text("model: {hidden_size: 64, vocab_size: 128, seq_length: 32}\nlayers: '[swa, moe]'\n"
                   "attention: {num_heads: 4}\nswa: {window: 4}\n"
                   "moe: {num_experts: 2, topk: 3, ffn_hidden_size: 16}\n")
    with pytest.raises(yl.HybridConfigError, match=r"moe.yaml: moe.topk: 3 > moe.num_experts \(2\)"):
        yl.load(moe)
    with pytest.raises(yl.HybridConfigError, match="missing.yaml: cannot read"):
        yl.load(tmp_path / "missing.yaml")


def test_unused_section_warns():
    raw = _base()
    raw["moe"] = {"num_experts": 2, "topk": 1, "ffn_hidden_size": 8}
    with pytest.warns(UserWarning, match="section 'moe' is ignored"):
        yl.parse(raw, "t.yaml")


def test_parallel_sizes_checked():
    hm = yl.parse(_base(), "t.yaml")
    with pytest.raises(yl.HybridConfigError, match="t.yaml: attention.num_heads: 4 not divisible by tensor_model_parallel_size=8"):
        yl.transformer_config(hm, tensor_model_parallel_size=8)
    with pytest.raises(yl.HybridConfigError, match="4 Megatron layers .* not divisible by pipeline_model_parallel_size=3"):
        yl.transformer_config(hm, pipeline_model_parallel_size=3)


def test_cli_count():
    out = subprocess.run([sys.executable, "-m", "megatron_gdn.hybrid.yaml_loader", "--count",
                          str(CONFIGS / "gdn_h1_1.3b.yaml")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    total = yl.count_parameters(yl.load(CONFIGS / "gdn_h1_1.3b.yaml"))["total"]
    assert f"{total:,} parameters" in out.stdout


def test_gdn_ablation_fields():
    """gdn.output_gate / short_conv / decay reach the layer's keywords and the count drops the
    z rows, the conv taps, the a rows with A_log / dt_bias; a conv bias without a conv fails."""
    raw = _base()
    raw["gdn"].update(output_gate=False, short_conv=False, decay=False)
    hm = yl.parse(raw, "abl.yaml")
    options = dict(hm.layers[0].options)
    assert hm.layers[0].mixer == "gdn"
    assert options["use_output_gate"] is options["use_short_conv"] is options["use_decay"] is False
    full = yl.count_parameters(yl.parse(_base(), "full.yaml"))["gdn"]
    h, H, HV, K, V, W = 64, 2, 4, 16, 16, 4
    removed = 2 * (h * HV * V + (2 * H * K + HV * V) * W + h * HV + 2 * HV)
    assert yl.count_parameters(hm)["gdn"] == full - removed
    raw["gdn"]["conv_bias"] = True
    with pytest.raises(yl.HybridConfigError, match="abl.yaml: gdn.conv_bias: true needs gdn.short_conv"):
        yl.parse(raw, "abl.yaml")


def _build_counts(paths):
    """Runs in one gloo process: build every tiny preset, return {name: (built, analytic)}."""
    import torch

    init_megatron()
    out = {}
    try:
        for path in paths:
            hm = yl.load(path)
            config = yl.transformer_config(hm, use_cpu_initialization=True)
            model = yl.build_gpt_model(hm, config)
            tokens = torch.randint(0, hm.model["vocab_size"], (2, hm.model["seq_length"]))
            logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
            out[hm.name] = (sum(p.numel() for p in model.parameters()),
                            yl.count_parameters(hm)["total"], tuple(logits.shape))
    finally:
        destroy_megatron()
    return out


def test_tiny_presets_build_with_the_analytic_count(tmp_path):
    # plus tiny_gdn with every GDN ablation off (the count must follow the removed parameters)
    import yaml

    raw = yaml.safe_load((CONFIGS / "tiny_gdn.yaml").read_text())
    raw["name"] = "tiny_gdn_ablated"
    raw["gdn"].update(output_gate=False, short_conv=False, decay=False)
    ablated = tmp_path / "tiny_gdn_ablated.yaml"
    ablated.write_text(yaml.safe_dump(raw))
    tiny = sorted(str(p) for p in CONFIGS.glob("tiny_*.yaml"))
    (out,) = run_distributed(_build_counts, world_size=1, args=(tiny + [str(ablated)],))
    for name, result in out.items():
        built, analytic, shape = result
        print(f"{name}: built {built:,}, analytic {analytic:,}")
        assert built == analytic, name
        assert shape == (2, 32, 128)
    assert set(out) == {Path(p).stem for p in tiny} | {"tiny_gdn_ablated"}
