"""Hugging Face `Qwen3NextForCausalLM` <-> megatron-gdn (YAML model file + TP=1 state dict).

Layer i of Qwen3-Next is Megatron layer i: its token mixer (`linear_attn`: Gated DeltaNet, or
`self_attn`: gated softmax attention) then its FFN (sparse MoE with a gated shared expert, or
a dense SwiGLU MLP for layers in `mlp_only_layers`). What differs from a plain port:

- GDN projections: Qwen3-Next interleaves in_proj_qkvz / in_proj_ba per key-head group; ours
  holds sections [q | k | v | z | b | a] (transforms.gdn_in_proj_qwen3_next).
- RMSNorms outside the GDN output norm are zero-centred ("1 + w"); ours are plain (w).
- Attention: q_proj carries [query | output gate] per head; Megatron's linear_qkv with
  attention_output_gate carries [queries | gates | k | v] per key-value group. Partial RoPE
  (rotate-half on the first rope_fraction of each head) is the same convention in both.
- MoE: softmax over experts, top-k, renormalised (norm_topk_prob) equals Megatron's top-k then
  softmax; the shared expert's sigmoid gate needs `moe_shared_expert_gate`, which the YAML
  format does not carry: it travels as a config override in convert.json.

The MoE weights are accepted both as transformers holds them in memory (experts.gate_up_proj
[E, 2I, h], experts.down_proj [E, h, I]) and as released checkpoints store them
(experts.<e>.{gate,up,down}_proj.weight); export writes the in-memory form.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

import torch

from megatron_gdn.convert import transforms as T
from megatron_gdn.convert.mapping import ConversionError, Rule, convert

__all__ = ["yaml_from_hf_config", "hf_config_from_yaml", "rules", "to_megatron", "to_hf",
           "fuse_released_experts"]


def _get(cfg, name, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _rope(cfg) -> Tuple[float, float]:
    rope = _get(cfg, "rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(f"rope_parameters.rope_type={rope_type!r}: only 'default' RoPE is supported")
    theta = rope.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    fraction = rope.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 0.25))
    return float(theta), float(fraction)


def yaml_from_hf_config(cfg) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A Qwen3NextConfig (object or dict) -> (YAML model dict, TransformerConfig overrides)."""
    checks = {"hidden_act": ("silu",), "attention_bias": (False, None), "norm_topk_prob": (True,)}
    for name, allowed in checks.items():
        value = _get(cfg, name, allowed[0])
        if value not in allowed:
            raise ConversionError(f"{name}={value!r}: not supported (expected {allowed[0]!r})")
    n = int(_get(cfg, "num_hidden_layers"))
    layer_types = list(_get(cfg, "layer_types"))
    if len(layer_types) != n:
        raise ConversionError(f"layer_types has {len(layer_types)} entries, num_hidden_layers={n}")
    mlp_only = set(_get(cfg, "mlp_only_layers") or [])
    num_experts = int(_get(cfg, "num_experts", 0) or 0)
    step = int(_get(cfg, "decoder_sparse_step", 1))
    items = []
    for i, kind in enumerate(layer_types):
        if kind not in ("linear_attention", "full_attention"):
            raise ConversionError(f"layer_types[{i}]={kind!r}: expected 'linear_attention' or 'full_attention'")
        items.append("gdn" if kind == "linear_attention" else "attention")
        items.append("moe" if _is_moe(i, mlp_only, num_experts, step) else "mlp")
    theta, fraction = _rope(cfg)
    hidden = int(_get(cfg, "hidden_size"))
    doc: Dict[str, Any] = {
        "name": "qwen3_next_converted",
        "model": {
            "hidden_size": hidden,
            "vocab_size": int(_get(cfg, "vocab_size")),
            "seq_length": int(_get(cfg, "max_position_embeddings")),
            "normalization": "RMSNorm",
            "norm_epsilon": float(_get(cfg, "rms_norm_eps")),
            "position_embedding": "rope",
            "rope_base": theta,
            "rope_fraction": fraction,
            "tie_embeddings": bool(_get(cfg, "tie_word_embeddings", False)),
            "init_std": float(_get(cfg, "initializer_range", 0.02)),
        },
        "layers": "[" + ", ".join(items) + "]",
    }
    overrides: Dict[str, Any] = {}
    if "gdn" in items:
        doc["gdn"] = {
            "num_key_heads": int(_get(cfg, "linear_num_key_heads")),
            "num_value_heads": int(_get(cfg, "linear_num_value_heads")),
            "key_head_dim": int(_get(cfg, "linear_key_head_dim")),
            "value_head_dim": int(_get(cfg, "linear_value_head_dim")),
            "conv_kernel": int(_get(cfg, "linear_conv_kernel_dim")),
            "conv_bias": False,
            "qk_l2norm": True,
        }
    if "attention" in items:
        heads = int(_get(cfg, "num_attention_heads"))
        doc["attention"] = {
            "num_heads": heads,
            "num_kv_heads": int(_get(cfg, "num_key_value_heads")),
            "head_dim": int(_get(cfg, "head_dim", None) or hidden // heads),
            "gated": True,
            "qk_norm": True,
        }
    if "mlp" in items:
        doc["mlp"] = {"ffn_hidden_size": int(_get(cfg, "intermediate_size")), "activation": "swiglu"}
    if "moe" in items:
        shared = int(_get(cfg, "shared_expert_intermediate_size", 0) or 0)
        doc["moe"] = {
            "num_experts": num_experts,
            "topk": int(_get(cfg, "num_experts_per_tok")),
            "ffn_hidden_size": int(_get(cfg, "moe_intermediate_size")),
            "shared_ffn_hidden_size": shared,
            "aux_loss_coeff": float(_get(cfg, "router_aux_loss_coef", 0.0) or 0.0),
        }
        if shared:
            overrides["moe_shared_expert_gate"] = True
    return doc, overrides


def _is_moe(i: int, mlp_only, num_experts: int, step: int) -> bool:
    return i not in mlp_only and num_experts > 0 and (i + 1) % step == 0


def hf_config_from_yaml(hm) -> Dict[str, Any]:
    """Qwen3NextConfig keyword arguments for a validated HybridModel (megatron_gdn.hybrid)."""
    m, s = hm.model, hm.sections
    layer_types, mlp_only = [], []
    for i, plan in enumerate(hm.layers):
        if plan.mixer not in ("gdn", "attention") or plan.ffn not in ("mlp", "moe"):
            raise ConversionError(
                f"layers[{i}] = {plan.mixer}+{plan.ffn}: Qwen3-Next layers are (gdn | attention) + (mlp | moe)")
        layer_types.append("linear_attention" if plan.mixer == "gdn" else "full_attention")
        if plan.ffn == "mlp":
            mlp_only.append(i)
    if m["normalization"] != "RMSNorm" or m["position_embedding"] != "rope":
        raise ConversionError("Qwen3-Next needs model.normalization=RMSNorm and model.position_embedding=rope")
    kw: Dict[str, Any] = dict(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], num_hidden_layers=hm.num_layers,
        max_position_embeddings=m["seq_length"], rms_norm_eps=m["norm_epsilon"],
        tie_word_embeddings=m["tie_embeddings"], initializer_range=m["init_std"], hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": m["rope_base"],
                         "partial_rotary_factor": m["rope_fraction"]},
        layer_types=layer_types, mlp_only_layers=mlp_only, decoder_sparse_step=1,
    )
    if hm.uses("gdn"):
        g = s["gdn"]
        if g["conv_bias"] or not g["qk_l2norm"]:
            raise ConversionError("Qwen3-Next's GDN has no conv bias and L2-normalises q/k "
                                  "(gdn.conv_bias must be false, gdn.qk_l2norm true)")
        off = [name for name in ("output_gate", "short_conv", "decay") if not g[name]]
        if off:
            raise ConversionError(f"Qwen3-Next's GDN has an output gate, a short conv and a decay: "
                                  f"gdn.{', gdn.'.join(off)} must be true")
        kw.update(linear_num_key_heads=g["num_key_heads"], linear_num_value_heads=g["num_value_heads"],
                  linear_key_head_dim=g["key_head_dim"], linear_value_head_dim=g["value_head_dim"],
                  linear_conv_kernel_dim=g["conv_kernel"])
    if hm.uses("attention"):
        a = s["attention"]
        if not (a["gated"] and a["qk_norm"]):
            raise ConversionError("Qwen3-Next attention is gated with q/k norms (attention.gated and "
                                  "attention.qk_norm must be true)")
        kw.update(num_attention_heads=a["num_heads"], num_key_value_heads=a["num_kv_heads"], head_dim=a["head_dim"])
    if hm.uses("mlp"):
        kw.update(intermediate_size=s["mlp"]["ffn_hidden_size"])
    if hm.uses("moe"):
        mo = s["moe"]
        kw.update(num_experts=mo["num_experts"], num_experts_per_tok=mo["topk"],
                  moe_intermediate_size=mo["ffn_hidden_size"],
                  shared_expert_intermediate_size=mo["shared_ffn_hidden_size"],
                  router_aux_loss_coef=mo["aux_loss_coeff"], norm_topk_prob=True)
    else:
        kw.update(num_experts=0)
    return kw


def rules(hm) -> List[Rule]:
    """The full mapping table of one model (a validated HybridModel)."""
    m, s = hm.model, hm.sections
    h, vocab = m["hidden_size"], m["vocab_size"]
    out = [
        Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), T.COPY, ((vocab, h),), ((vocab, h),)),
        Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), T.ZERO_CENTRED_NORM, ((h,),), ((h,),)),
    ]
    if not m["tie_embeddings"]:
        out.append(Rule(("output_layer.weight",), ("lm_head.weight",), T.COPY, ((vocab, h),), ((vocab, h),)))
    for i, plan in enumerate(hm.layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        norm = lambda o, t: Rule((ours + o,), (theirs + t,), T.ZERO_CENTRED_NORM, ((h,),), ((h,),))  # noqa: E731
        out.append(norm("input_layernorm.weight", "input_layernorm.weight"))
        out.append(norm("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"))
        if plan.mixer == "gdn":
            out += _gdn_rules(s["gdn"], h, ours + "self_attention.", theirs + "linear_attn.")
        elif plan.mixer == "attention":
            out += _attention_rules(s["attention"], h, ours + "self_attention.", theirs + "self_attn.")
        else:
            raise ConversionError(f"layers[{i}]: mixer {plan.mixer!r} has no Qwen3-Next counterpart")
        if plan.ffn == "mlp":
            f = s["mlp"]["ffn_hidden_size"]
            out += _mlp_rules(h, f, ours + "mlp.", theirs + "mlp.", "")
        elif plan.ffn == "moe":
            out += _moe_rules(s["moe"], h, ours + "mlp.", theirs + "mlp.")
        else:
            raise ConversionError(f"layers[{i}]: FFN {plan.ffn!r} has no Qwen3-Next counterpart")
    return out


def _gdn_rules(g, h, ours, theirs) -> List[Rule]:
    H, HV, K, V, W = (g["num_key_heads"], g["num_value_heads"], g["key_head_dim"], g["value_head_dim"],
                      g["conv_kernel"])
    D = 2 * H * K + HV * V
    return [
        Rule((ours + "in_proj.weight",), (theirs + "in_proj_qkvz.weight", theirs + "in_proj_ba.weight"),
             T.gdn_in_proj_qwen3_next(H, HV, K, V), ((2 * H * K + 2 * HV * V + 2 * HV, h),),
             ((2 * H * K + 2 * HV * V, h), (2 * HV, h))),
        Rule((ours + "conv_weight",), (theirs + "conv1d.weight",), T.CONV_DW, ((D, W),), ((D, 1, W),)),
        Rule((ours + "A_log",), (theirs + "A_log",), T.COPY, ((HV,),), ((HV,),)),
        Rule((ours + "dt_bias",), (theirs + "dt_bias",), T.COPY, ((HV,),), ((HV,),)),
        # the gated output norm multiplies by w (not 1 + w) in Qwen3-Next too
        Rule((ours + "out_norm_weight",), (theirs + "norm.weight",), T.COPY, ((V,),), ((V,),)),
        Rule((ours + "out_proj.weight",), (theirs + "out_proj.weight",), T.COPY, ((h, HV * V),), ((h, HV * V),)),
    ]


def _attention_rules(a, h, ours, theirs) -> List[Rule]:
    np_, ng, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    return [
        Rule((ours + "linear_qkv.weight",),
             (theirs + "q_proj.weight", theirs + "k_proj.weight", theirs + "v_proj.weight"),
             T.gated_qkv(np_, ng, d), ((2 * np_ * d + 2 * ng * d, h),),
             ((2 * np_ * d, h), (ng * d, h), (ng * d, h))),
        Rule((ours + "q_layernorm.weight",), (theirs + "q_norm.weight",), T.ZERO_CENTRED_NORM, ((d,),), ((d,),)),
        Rule((ours + "k_layernorm.weight",), (theirs + "k_norm.weight",), T.ZERO_CENTRED_NORM, ((d,),), ((d,),)),
        Rule((ours + "linear_proj.weight",), (theirs + "o_proj.weight",), T.COPY, ((h, np_ * d),), ((h, np_ * d),)),
    ]


def _mlp_rules(h, f, ours, theirs, _) -> List[Rule]:
    return [
        Rule((ours + "linear_fc1.weight",), (theirs + "gate_proj.weight", theirs + "up_proj.weight"),
             T.SWIGLU_FC1, ((2 * f, h),), ((f, h), (f, h))),
        Rule((ours + "linear_fc2.weight",), (theirs + "down_proj.weight",), T.COPY, ((h, f),), ((h, f),)),
    ]


def _moe_rules(mo, h, ours, theirs) -> List[Rule]:
    E, f, fs = mo["num_experts"], mo["ffn_hidden_size"], mo["shared_ffn_hidden_size"]
    fc1 = tuple(f"{ours}experts.local_experts.{e}.linear_fc1.weight" for e in range(E))
    fc2 = tuple(f"{ours}experts.local_experts.{e}.linear_fc2.weight" for e in range(E))
    out = [
        Rule((ours + "router.weight",), (theirs + "gate.weight",), T.COPY, ((E, h),), ((E, h),)),
        Rule(fc1, (theirs + "experts.gate_up_proj",), T.experts_fc1(E), ((2 * f, h),) * E, ((E, 2 * f, h),)),
        Rule(fc2, (theirs + "experts.down_proj",), T.experts_fc2(E), ((h, f),) * E, ((E, h, f),)),
    ]
    if fs:
        out += _mlp_rules(h, fs, ours + "shared_experts.", theirs + "shared_expert.", "")
        out.append(Rule((ours + "shared_experts.gate_weight",), (theirs + "shared_expert_gate.weight",),
                        T.COPY, ((1, h),), ((1, h),)))
    return out


_RELEASED = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_released_experts(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released checkpoints store experts one by one (experts.<e>.gate_proj.weight, ...);
    fuse them into transformers' in-memory layout (experts.gate_up_proj, experts.down_proj)."""
    out, groups = {}, {}
    for key, tensor in state.items():
        m = _RELEASED.match(key)
        if m is None:
            out[key] = tensor
        else:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
    for prefix, experts in groups.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            raise ConversionError(f"{prefix}: expert indices {ids} are not 0..{len(ids) - 1}")
        for e in ids:
            missing = {"gate_proj", "up_proj", "down_proj"} - set(experts[e])
            if missing:
                raise ConversionError(f"{prefix}.{e}: missing {', '.join(sorted(missing))}")
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in ids])
        out[prefix + ".down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out


def to_megatron(hm, hf_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Qwen3-Next state dict -> our TP=1 GPTModel state dict (keys of `hm`'s model)."""
    return convert(rules(hm), fuse_released_experts(hf_state), "to_ours")


def to_hf(hm, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our TP=1 state dict -> Qwen3-Next state dict; `_extra_state` entries are skipped."""
    ours = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    return convert(rules(hm), ours, "to_theirs")


def split_released_experts(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of fuse_released_experts: the layout save_pretrained writes and the Hub holds."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e in range(tensor.shape[0]):
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = up.contiguous()
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[key] = tensor
    return out


def hf_config_dict(hm) -> Dict[str, Any]:
    """config.json contents of the exported model (via transformers' Qwen3NextConfig)."""
    import transformers

    cfg = transformers.Qwen3NextConfig(**hf_config_from_yaml(hm))
    cfg.architectures = ["Qwen3NextForCausalLM"]
    return cfg.to_dict()


ARCHITECTURE = "Qwen3NextForCausalLM"
MODEL_TYPE = "qwen3_next"


def read_hf_config(config_dict: Mapping[str, Any]):
    """config.json -> Qwen3NextConfig (fills layer_types and other defaults)."""
    import transformers

    return transformers.Qwen3NextConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})


def to_hf_files(hm, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our state dict -> the tensors of model.safetensors (released per-expert layout)."""
    return split_released_experts(to_hf(hm, state))
