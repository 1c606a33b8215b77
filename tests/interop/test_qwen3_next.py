"""Hugging Face Qwen3-Next (transformers' own torch code, tiny, random) -> megatron-gdn:

- logits of the converted GPTModel equal the source model's (fp32, relative RMS <= 1e-4),
  with every layer kind: GDN, gated attention (q/k norms, partial RoPE), MoE with a gated
  shared expert, a dense MLP layer (mlp_only_layers);
- export back: every tensor bit for bit (norm weights bf16-representable, as in released
  checkpoints: ours = 1 + w in fp32 is then exact);
- released per-expert layout accepted; missing, mis-shaped and unmapped tensors are named;
- the CLI writes a directory the model builder loads.
"""
import pytest
import torch

from megatron_gdn.testing.dist import megatron_parallel, run_distributed
from tolerance import assert_close

transformers = pytest.importorskip("transformers")

# fp32 through ~20 ops per layer in two implementations (different summation orders, SDPA vs
# eager softmax): ~1e-7 measured; the bar is 1e-4
LOGITS_REL = 1e-4


def tiny_config(**kw):
    args = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=32, mlp_only_layers=[1],
                max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    args.update(kw)
    return transformers.Qwen3NextConfig(**args)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and ".linear_attn." not in name:
                # zero-centred norms: random, bf16-representable (released checkpoints are bf16)
                p.copy_((0.1 * torch.randn_like(p)).bfloat16().float())
            elif name.endswith(("dt_bias", "linear_attn.norm.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def convert_to_dir(hf_model, out_dir):
    from megatron_gdn.convert import checkpoint_io, qwen3_next
    from megatron_gdn.hybrid import yaml_loader as yl

    doc, overrides = qwen3_next.yaml_from_hf_config(hf_model.config)
    hm = yl.parse(doc, "converted.yaml")
    state = qwen3_next.to_megatron(hm, hf_model.state_dict())
    checkpoint_io.write(out_dir, doc, overrides, state, "Qwen3NextForCausalLM (test)")
    return hm, state


def _megatron_logits(ckpt_dir, tokens):
    from megatron_gdn.convert import build_model

    with megatron_parallel(tp=1):
        model = build_model(ckpt_dir).eval()
        positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
        with torch.no_grad():
            return model(tokens, positions, None)


def test_logits_match(tmp_path):
    hf = tiny_model()
    convert_to_dir(hf, tmp_path)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    (actual,) = run_distributed(_megatron_logits, world_size=1, args=(str(tmp_path), tokens))
    assert_close(actual, expected, LOGITS_REL, "logits")


def test_export_round_trip_bit_exact():
    from megatron_gdn.convert import qwen3_next
    from megatron_gdn.hybrid import yaml_loader as yl

    hf = tiny_model(seed=3)
    doc, _ = qwen3_next.yaml_from_hf_config(hf.config)
    hm = yl.parse(doc, "converted.yaml")
    ours = qwen3_next.to_megatron(hm, hf.state_dict())
    back = qwen3_next.to_hf(hm, ours)
    source = hf.state_dict()
    assert sorted(back) == sorted(source)
    for key, tensor in source.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    # and the config: the exported kwargs build the same architecture
    kw = qwen3_next.hf_config_from_yaml(hm)
    again = transformers.Qwen3NextConfig(**kw)
    for name in ("layer_types", "mlp_only_layers", "num_experts", "linear_num_value_heads", "head_dim"):
        assert getattr(again, name) == getattr(hf.config, name), name
    assert again.rope_parameters["partial_rotary_factor"] == 0.5


def test_gdn_layout_is_per_key_head_group():
    """in_proj_qkvz rows of key head 1 must land in the second half of each of our sections."""
    from megatron_gdn.convert import transforms

    H, HV, K, V, h = 2, 4, 3, 2, 5
    r = HV // H
    rows_per_group = 2 * K + 2 * r * V
    qkvz = torch.arange(H * rows_per_group, dtype=torch.float32)[:, None].expand(-1, h).clone()
    ba = 1000 + torch.arange(2 * HV, dtype=torch.float32)[:, None].expand(-1, h).clone()
    (ours,) = transforms.gdn_in_proj_qwen3_next(H, HV, K, V).to_ours([qkvz, ba])
    q, k, v, z, b, a = ours[:, 0].split([H * K, H * K, HV * V, HV * V, HV, HV])
    assert q.tolist() == [0, 1, 2, rows_per_group, rows_per_group + 1, rows_per_group + 2]
    assert k[:K].tolist() == [3, 4, 5]
    assert v[:r * V].tolist() == [6, 7, 8, 9] and z[:r * V].tolist() == [10, 11, 12, 13]
    assert b.tolist() == [1000, 1001, 1004, 1005] and a.tolist() == [1002, 1003, 1006, 1007]


def test_released_expert_layout_and_errors():
    from megatron_gdn.convert import ConversionError, qwen3_next
    from megatron_gdn.hybrid import yaml_loader as yl

    hf = tiny_model(seed=5)
    doc, _ = qwen3_next.yaml_from_hf_config(hf.config)
    hm = yl.parse(doc, "converted.yaml")
    source = hf.state_dict()
    released = {}
    for key, t in source.items():
        if key.endswith("experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                released[f"{base}{e}.gate_proj.weight"] = gate
                released[f"{base}{e}.up_proj.weight"] = up
        elif key.endswith("experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                released[f"{base}{e}.down_proj.weight"] = t[e]
        else:
            released[key] = t
    a, b = qwen3_next.to_megatron(hm, source), qwen3_next.to_megatron(hm, released)
    assert all(torch.equal(a[k], b[k]) for k in a)

    missing = dict(source)
    del missing["model.layers.0.linear_attn.A_log"]
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.linear_attn\.A_log: missing"):
        qwen3_next.to_megatron(hm, missing)
    bad = dict(source, **{"model.layers.3.self_attn.k_proj.weight": torch.zeros(16, 64)})
    with pytest.raises(ConversionError, match=r"k_proj\.weight: expected shape \(32, 64\), got \(16, 64\)"):
        qwen3_next.to_megatron(hm, bad)
    extra = dict(source, **{"model.layers.0.linear_attn.mystery": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"unmapped tensors.*linear_attn\.mystery"):
        qwen3_next.to_megatron(hm, extra)
    with pytest.raises(ConversionError, match="hidden_act='gelu'"):
        qwen3_next.yaml_from_hf_config(tiny_config(hidden_act="gelu"))
    no_decay = yl.parse(dict(doc, gdn=dict(doc["gdn"], decay=False)), "deltanet.yaml")
    with pytest.raises(ConversionError, match=r"gdn\.decay must be true"):
        qwen3_next.hf_config_from_yaml(no_decay)


def test_cli_import_and_export(tmp_path):
    from megatron_gdn.convert.__main__ import main

    hf = tiny_model(seed=7)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    assert main(["import-hf", str(src), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "model.yaml").is_file()
    assert main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    again = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "back").eval()
    for key, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
