"""fla GatedDeltaNetForCausalLM mapping on the CPU (fla's model needs its Triton kernels, so
the state dict is built here with fla 0.6.0's names and shapes): round trip bit for bit, our
sections come from the right fla projections, the converted state loads into the GPTModel
built from the YAML, fla hybrids are refused. The logits check runs on a GPU:
scripts/check_fla_convert_gpu.py."""
import pytest
import torch

from megatron_gdn.testing.dist import megatron_parallel, run_distributed

CONFIG = {"model_type": "gated_deltanet", "hidden_size": 64, "vocab_size": 128, "num_hidden_layers": 2,
          "num_heads": 2, "num_v_heads": 4, "head_dim": 16, "expand_v": 1.0, "conv_size": 4,
          "hidden_ratio": 4, "intermediate_size": None, "norm_eps": 1e-6, "max_position_embeddings": 64,
          "use_gate": True, "use_short_conv": True, "allow_neg_eigval": False, "hidden_act": "swish",
          "tie_word_embeddings": False, "attn": None}


def fla_state(cfg=CONFIG, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, H, HV, K = cfg["hidden_size"], cfg["num_heads"], cfg["num_v_heads"], cfg["head_dim"]
    V = int(K * cfg["expand_v"])
    f = 256  # 2/3 * 4 * 64 = 170, rounded up to a multiple of 256
    shapes = {"model.embeddings.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "attn_norm.weight": (h,), p + "mlp_norm.weight": (h,),
            p + "attn.q_proj.weight": (H * K, h), p + "attn.k_proj.weight": (H * K, h),
            p + "attn.v_proj.weight": (HV * V, h), p + "attn.g_proj.weight": (HV * V, h),
            p + "attn.a_proj.weight": (HV, h), p + "attn.b_proj.weight": (HV, h),
            p + "attn.A_log": (HV,), p + "attn.dt_bias": (HV,), p + "attn.o_norm.weight": (V,),
            p + "attn.q_conv1d.weight": (H * K, 1, 4), p + "attn.k_conv1d.weight": (H * K, 1, 4),
            p + "attn.v_conv1d.weight": (HV * V, 1, 4), p + "attn.o_proj.weight": (h, HV * V),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _hm():
    from megatron_gdn.convert import fla_gdn
    from megatron_gdn.hybrid import yaml_loader as yl

    doc, _ = fla_gdn.yaml_from_hf_config(CONFIG)
    return yl.parse(doc, "fla.yaml")


def test_round_trip_and_sections():
    from megatron_gdn.convert import fla_gdn

    hm = _hm()
    assert hm.sections["mlp"]["ffn_hidden_size"] == 256
    src = fla_state()
    ours = fla_gdn.to_megatron(hm, src)
    w = ours["decoder.layers.1.self_attention.in_proj.weight"]
    q, k, v, z, b, a = w.split([32, 32, 64, 64, 4, 4])
    assert torch.equal(z, src["model.layers.1.attn.g_proj.weight"])
    assert torch.equal(b, src["model.layers.1.attn.b_proj.weight"])
    assert torch.equal(a, src["model.layers.1.attn.a_proj.weight"])
    conv = ours["decoder.layers.0.self_attention.conv_weight"]
    assert torch.equal(conv[32:64], src["model.layers.0.attn.k_conv1d.weight"][:, 0])
    back = fla_gdn.to_hf(hm, ours)
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)


def _load_into_model(state):
    from megatron_gdn.convert.mapping import check_model_keys
    from megatron_gdn.hybrid import yaml_loader as yl

    with megatron_parallel(tp=1):
        hm = _hm()
        model = yl.build_gpt_model(hm, yl.transformer_config(hm, use_cpu_initialization=True))
        check_model_keys(state, model.state_dict())
        model.load_state_dict(state, strict=False)
        return torch.equal(model.decoder.layers[1].self_attention.A_log.detach(),
                           state["decoder.layers.1.self_attention.A_log"])


def test_converted_state_loads():
    from megatron_gdn.convert import fla_gdn

    state = fla_gdn.to_megatron(_hm(), fla_state(seed=1))
    (ok,) = run_distributed(_load_into_model, world_size=1, args=(state,))
    assert ok


def test_refusals():
    from megatron_gdn.convert import ConversionError, fla_gdn

    with pytest.raises(ConversionError, match="attn="):
        fla_gdn.yaml_from_hf_config(dict(CONFIG, attn={"layers": [1], "num_heads": 4}))
    with pytest.raises(ConversionError, match="allow_neg_eigval=True"):
        fla_gdn.yaml_from_hf_config(dict(CONFIG, allow_neg_eigval=True))
