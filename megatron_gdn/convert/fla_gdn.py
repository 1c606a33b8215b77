"""flash-linear-attention (fla 0.6.0) `GatedDeltaNetForCausalLM` <-> megatron-gdn.

fla's block: attn_norm -> GatedDeltaNet (q/k/v/a/b/g projections, three short convs, A_log,
dt_bias, gated RMSNorm o_norm over the value head dim, o_proj) -> residual -> mlp_norm ->
SwiGLU (gate_proj, up_proj, down_proj) -> residual. Norms are plain RMSNorm (w), the decay and
beta follow the same parameterisation as ours (g = -exp(A_log) softplus(a + dt_bias),
beta = sigmoid(b), L2-normalised q/k), so the mapping is concatenation and reshapes only.

Supported: GDN-only stacks with use_gate, use_short_conv, no negative eigenvalues, SiLU
("swish"). fla's hybrid softmax-attention layers (config.attn) are refused with a
ConversionError. fla's model runs only with its Triton kernels (a GPU); CPU tests check the
mapping on state dicts with fla's names and shapes, scripts/check_fla_convert_gpu.py compares
logits on a GPU.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch

from megatron_gdn.convert import transforms as T
from megatron_gdn.convert.mapping import ConversionError, Rule, convert

__all__ = ["yaml_from_hf_config", "hf_config_dict", "rules", "to_megatron", "to_hf", "read_hf_config",
           "to_hf_files", "mlp_width", "ARCHITECTURE", "MODEL_TYPE"]

ARCHITECTURE = "GatedDeltaNetForCausalLM"
MODEL_TYPE = "gated_deltanet"


def mlp_width(hidden: int, hidden_ratio, intermediate_size) -> int:
    """fla GatedMLP's width: intermediate_size, else 2/3 * ratio * hidden rounded up to 256."""
    if intermediate_size is not None:
        return int(intermediate_size)
    width = int(hidden * (hidden_ratio or 4) * 2 / 3)
    return 256 * ((width + 255) // 256)


def read_hf_config(config_dict: Mapping[str, Any]) -> Dict[str, Any]:
    return dict(config_dict)


def yaml_from_hf_config(cfg: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """fla GatedDeltaNetConfig (dict) -> (YAML model dict, TransformerConfig overrides)."""
    get = cfg.get
    if get("attn") is not None:
        raise ConversionError(f"attn={get('attn')!r}: fla hybrid attention layers are not supported")
    for name, want in (("use_gate", True), ("use_short_conv", True), ("allow_neg_eigval", False)):
        if get(name, want) != want:
            raise ConversionError(f"{name}={get(name)!r}: not supported (expected {want!r})")
    if get("hidden_act", "swish") not in ("swish", "silu"):
        raise ConversionError(f"hidden_act={get('hidden_act')!r}: not supported (expected 'swish')")
    hidden = int(get("hidden_size", 2048))
    H = int(get("num_heads", 6))
    K = int(get("head_dim", 256))
    HV = int(get("num_v_heads") or H)
    V = K * float(get("expand_v", 2.0))
    if V != int(V):
        raise ConversionError(f"head_dim x expand_v = {V} is not an integer")
    doc = {
        "name": "fla_gated_deltanet_converted",
        "model": {
            "hidden_size": hidden,
            "vocab_size": int(get("vocab_size", 32000)),
            "seq_length": int(get("max_position_embeddings", 2048)),
            "normalization": "RMSNorm",
            "norm_epsilon": float(get("norm_eps", 1e-6)),
            "position_embedding": "none",
            "tie_embeddings": bool(get("tie_word_embeddings", False)),
            "init_std": float(get("initializer_range", 0.02)),
        },
        "layers": f"{int(get('num_hidden_layers', 21))} x [gdn, mlp]",
        "gdn": {"num_key_heads": H, "num_value_heads": HV, "key_head_dim": K, "value_head_dim": int(V),
                "conv_kernel": int(get("conv_size", 4)), "conv_bias": False, "qk_l2norm": True},
        "mlp": {"ffn_hidden_size": mlp_width(hidden, get("hidden_ratio", 4), get("intermediate_size")),
                "activation": "swiglu"},
    }
    return doc, {}


def hf_config_dict(hm) -> Dict[str, Any]:
    """config.json of the exported fla model."""
    m, g = hm.model, hm.sections["gdn"]
    for i, plan in enumerate(hm.layers):
        if (plan.mixer, plan.ffn) != ("gdn", "mlp"):
            raise ConversionError(f"layers[{i}] = {plan.mixer}+{plan.ffn}: fla GatedDeltaNet layers are gdn + mlp")
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "attn_mode": "chunk",
        "hidden_size": m["hidden_size"], "vocab_size": m["vocab_size"], "num_hidden_layers": hm.num_layers,
        "max_position_embeddings": m["seq_length"], "norm_eps": m["norm_epsilon"],
        "tie_word_embeddings": m["tie_embeddings"], "initializer_range": m["init_std"],
        "num_heads": g["num_key_heads"], "num_v_heads": g["num_value_heads"], "head_dim": g["key_head_dim"],
        "expand_v": g["value_head_dim"] / g["key_head_dim"], "conv_size": g["conv_kernel"],
        "use_gate": True, "use_short_conv": True, "allow_neg_eigval": False, "hidden_act": "swish",
        "intermediate_size": hm.sections["mlp"]["ffn_hidden_size"], "attn": None,
    }


def rules(hm) -> List[Rule]:
    m, s = hm.model, hm.sections
    h, vocab = m["hidden_size"], m["vocab_size"]
    g, f = s["gdn"], s["mlp"]["ffn_hidden_size"]
    H, HV, K, V, W = (g["num_key_heads"], g["num_value_heads"], g["key_head_dim"], g["value_head_dim"],
                      g["conv_kernel"])
    out = [
        Rule(("embedding.word_embeddings.weight",), ("model.embeddings.weight",), T.COPY, ((vocab, h),), ((vocab, h),)),
        Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), T.COPY, ((h,),), ((h,),)),
    ]
    if not m["tie_embeddings"]:
        out.append(Rule(("output_layer.weight",), ("lm_head.weight",), T.COPY, ((vocab, h),), ((vocab, h),)))
    for i, plan in enumerate(hm.layers):
        if (plan.mixer, plan.ffn) != ("gdn", "mlp"):
            raise ConversionError(f"layers[{i}] = {plan.mixer}+{plan.ffn}: fla GatedDeltaNet layers are gdn + mlp")
        o, t = f"decoder.layers.{i}.", f"model.layers.{i}."
        a, sa = t + "attn.", o + "self_attention."
        out += [
            Rule((o + "input_layernorm.weight",), (t + "attn_norm.weight",), T.COPY, ((h,),), ((h,),)),
            Rule((sa + "in_proj.weight",),
                 tuple(a + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight",
                                       "b_proj.weight", "a_proj.weight")),
                 T.gdn_in_proj_fla(H, HV, K, V), ((2 * H * K + 2 * HV * V + 2 * HV, h),),
                 ((H * K, h), (H * K, h), (HV * V, h), (HV * V, h), (HV, h), (HV, h))),
            Rule((sa + "conv_weight",), (a + "q_conv1d.weight", a + "k_conv1d.weight", a + "v_conv1d.weight"),
                 T.fla_conv(H, HV, K, V), ((2 * H * K + HV * V, W),), ((H * K, 1, W), (H * K, 1, W), (HV * V, 1, W))),
            Rule((sa + "A_log",), (a + "A_log",), T.COPY, ((HV,),), ((HV,),)),
            Rule((sa + "dt_bias",), (a + "dt_bias",), T.COPY, ((HV,),), ((HV,),)),
            Rule((sa + "out_norm_weight",), (a + "o_norm.weight",), T.COPY, ((V,),), ((V,),)),
            Rule((sa + "out_proj.weight",), (a + "o_proj.weight",), T.COPY, ((h, HV * V),), ((h, HV * V),)),
            Rule((o + "pre_mlp_layernorm.weight",), (t + "mlp_norm.weight",), T.COPY, ((h,),), ((h,),)),
            Rule((o + "mlp.linear_fc1.weight",), (t + "mlp.gate_proj.weight", t + "mlp.up_proj.weight"),
                 T.SWIGLU_FC1, ((2 * f, h),), ((f, h), (f, h))),
            Rule((o + "mlp.linear_fc2.weight",), (t + "mlp.down_proj.weight",), T.COPY, ((h, f),), ((h, f),)),
        ]
    return out


def to_megatron(hm, fla_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return convert(rules(hm), fla_state, "to_ours")


def to_hf(hm, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    ours = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    return convert(rules(hm), ours, "to_theirs")


to_hf_files = to_hf
