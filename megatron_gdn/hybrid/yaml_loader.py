"""Hybrid models declared in YAML -> Megatron objects (TransformerConfig, block spec, GPTModel).

    python -m megatron_gdn.hybrid.yaml_loader examples/configs/gdn_h1_1.3b.yaml --count

The format (README: "Hybrid models from YAML"):

    name: gdn_h1_1.3b
    model:     {hidden_size, vocab_size, seq_length, normalization: RMSNorm|LayerNorm,
                norm_epsilon, position_embedding: rope|none, rope_base, rope_fraction,
                tie_embeddings, init_std}
    layers:    "12 x [gdn, mlp, swa, mlp]"        (or a list of such strings / items)
    gdn:       {num_key_heads, num_value_heads, key_head_dim, value_head_dim, conv_kernel,
                conv_bias, qk_l2norm, output_gate, short_conv, decay}
               (the last three: ablations, default true; see megatron_gdn.layer)
    attention: {num_heads, num_kv_heads, head_dim, gated, qk_norm}   (attention and swa)
    swa:       {window}
    mlp:       {ffn_hidden_size, activation: swiglu|gelu}
    moe:       {num_experts, topk, ffn_hidden_size, shared_ffn_hidden_size, aux_loss_coeff}
    mamba2:    {state_dim, head_dim, expand, num_groups, conv_kernel}

Layer items are mixers (gdn, attention, swa, mamba2) and FFNs (mlp, moe); a mixer and the FFN
right after it form one Megatron TransformerLayer (a lone mixer or a lone FFN is a layer with
an identity in the other slot). An item may be a mapping `{swa: {window: 1024}}` to set the
window of one layer. Softmax-attention layers share the `attention` sizes (one RoPE table).

Every error is a HybridConfigError (a ValueError) naming the file, the place (`layers[5]`,
`gdn.num_key_heads`) and the value.

Pipeline parallel: `block_spec` builds the specs of all layers and keeps the slice of this
stage with Megatron's own `get_transformer_layer_offset` / `get_num_layers_to_build` (the
same slicing as megatron.core's get_gpt_decoder_block_spec), so uneven first/last stages and
virtual pipeline stages behave as for Megatron's GPT.
"""
from __future__ import annotations

import argparse
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "HybridConfigError", "HybridModel", "LayerPlan", "load", "parse", "parse_layers",
    "transformer_config", "block_spec", "build_gpt_model", "count_parameters",
]

MIXERS = ("gdn", "attention", "swa", "mamba2")
FFNS = ("mlp", "moe")


class HybridConfigError(ValueError):
    """A YAML model description is invalid; the message names the file, place and value."""


# ------------------------------------------------------------------------------ the schema
# field: (kind, default); default REQUIRED means the field must be given
REQUIRED = object()
SCHEMA: Dict[str, Dict[str, Tuple[str, Any]]] = {
    "model": {
        "hidden_size": ("pos_int", REQUIRED),
        "vocab_size": ("pos_int", REQUIRED),
        "seq_length": ("pos_int", REQUIRED),
        "normalization": (("RMSNorm", "LayerNorm"), "RMSNorm"),
        "norm_epsilon": ("pos_float", 1e-6),
        "position_embedding": (("rope", "none"), "rope"),
        "rope_base": ("pos_float", 10000.0),
        "rope_fraction": ("fraction", 1.0),
        "tie_embeddings": ("bool", False),
        "init_std": ("pos_float", 0.02),
    },
    "gdn": {
        "num_key_heads": ("pos_int", REQUIRED),
        "num_value_heads": ("pos_int", None),
        "key_head_dim": ("pos_int", REQUIRED),
        "value_head_dim": ("pos_int", None),
        "conv_kernel": ("pos_int", 4),
        "conv_bias": ("bool", False),
        "qk_l2norm": ("bool", True),
        "output_gate": ("bool", True),
        "short_conv": ("bool", True),
        "decay": ("bool", True),
    },
    "attention": {
        "num_heads": ("pos_int", REQUIRED),
        "num_kv_heads": ("pos_int", None),
        "head_dim": ("pos_int", None),
        "gated": ("bool", False),
        "qk_norm": ("bool", False),
    },
    "swa": {"window": ("pos_int", REQUIRED)},
    "mlp": {
        "ffn_hidden_size": ("pos_int", REQUIRED),
        "activation": (("swiglu", "gelu"), "swiglu"),
    },
    "moe": {
        "num_experts": ("pos_int", REQUIRED),
        "topk": ("pos_int", REQUIRED),
        "ffn_hidden_size": ("pos_int", REQUIRED),
        "shared_ffn_hidden_size": ("nonneg_int", 0),
        "aux_loss_coeff": ("nonneg_float", 0.0),
    },
    "mamba2": {
        "state_dim": ("pos_int", 128),
        "head_dim": ("pos_int", 64),
        "expand": ("pos_int", 2),
        "num_groups": ("pos_int", 1),
        "conv_kernel": ("pos_int", 4),
    },
}
# sections a layer type reads
SECTIONS_OF = {"gdn": ("gdn",), "attention": ("attention",), "swa": ("attention", "swa"),
               "mamba2": ("mamba2",), "mlp": ("mlp",), "moe": ("moe",)}
# options one layer item may set for itself
PER_LAYER = {"swa": ("window",)}


@dataclass(frozen=True)
class LayerPlan:
    """One Megatron TransformerLayer: mixer (or None), FFN (or None), the mixer's own options,
    and the indices of the expanded layer items it came from (for messages)."""

    mixer: Optional[str]
    ffn: Optional[str]
    options: Tuple[Tuple[str, Any], ...] = ()
    items: Tuple[int, ...] = ()

    def option(self, name, default=None):
        return dict(self.options).get(name, default)


@dataclass
class HybridModel:
    """A validated YAML model description."""

    source: str
    name: str
    model: Dict[str, Any]
    sections: Dict[str, Dict[str, Any]]
    layers: List[LayerPlan] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def uses(self, kind: str) -> bool:
        return any(kind in (p.mixer, p.ffn) for p in self.layers)

    @property
    def attention_head_dim(self) -> int:
        att = self.sections["attention"]
        return att["head_dim"] or self.model["hidden_size"] // att["num_heads"]

    def pattern(self) -> str:
        """One line per layer type sequence, e.g. 'gdn+mlp swa+mlp ...'."""
        return " ".join("+".join(x for x in (p.mixer, p.ffn) if x) for p in self.layers)


# ------------------------------------------------------------------------------ parsing
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\[)|(\])|(,)|(\*))")


def _tokens(text: str, where: str, source: str):
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise HybridConfigError(f"{source}: {where}: cannot parse {text[pos:]!r} in {text!r}")
        num, name, lb, rb, comma, star = m.groups()
        if num is not None:
            out.append(("int", int(num)))
        elif name is not None:
            out.append(("x", None) if name == "x" else ("name", name))
        elif lb:
            out.append(("[", None))
        elif rb:
            out.append(("]", None))
        elif comma:
            out.append((",", None))
        else:
            out.append(("x", None))
        pos = m.end()
    return out


def _parse_seq(toks, i, where, source, text):
    items = []
    while True:
        items_part, i = _parse_term(toks, i, where, source, text)
        items += items_part
        if i < len(toks) and toks[i][0] == ",":
            i += 1
            continue
        return items, i


def _parse_term(toks, i, where, source, text):
    def fail(msg):
        raise HybridConfigError(f"{source}: {where}: {msg} in {text!r}")

    if i >= len(toks):
        fail("expected a layer type")
    kind, val = toks[i]
    if kind == "name":
        return [val], i + 1
    if kind == "[":
        body, i = _parse_seq(toks, i + 1, where, source, text)
        if i >= len(toks) or toks[i][0] != "]":
            fail("missing ']'")
        return body, i + 1
    if kind != "int":
        fail(f"expected a layer type or 'N x [...]', got {val or kind!r}")
    count = val
    if count < 1:
        fail(f"repeat count must be >= 1, got {count}")
    if i + 1 >= len(toks) or toks[i + 1][0] != "x":
        fail(f"expected 'x' after the repeat count {count}")
    i += 2
    if i < len(toks) and toks[i][0] == "[":
        body, i = _parse_seq(toks, i + 1, where, source, text)
        if i >= len(toks) or toks[i][0] != "]":
            fail("missing ']'")
        return body * count, i + 1
    body, i = _parse_term(toks, i, where, source, text)
    return body * count, i


def parse_layers(spec, source: str = "<yaml>") -> List[Tuple[str, Dict[str, Any]]]:
    """Expand the `layers` entry into [(type, per-layer options)], unvalidated types."""
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list) or not spec:
        raise HybridConfigError(f"{source}: layers: expected a non-empty string or list, got {spec!r}")
    out: List[Tuple[str, Dict[str, Any]]] = []
    for n, entry in enumerate(spec):
        where = f"layers entry {n}"
        if isinstance(entry, str):
            toks = _tokens(entry, where, source)
            names, i = _parse_seq(toks, 0, where, source, entry)
            if i != len(toks):
                raise HybridConfigError(f"{source}: {where}: unexpected {toks[i][1] or toks[i][0]!r} in {entry!r}")
            out += [(name, {}) for name in names]
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, opts), = entry.items()
            if opts is None:
                opts = {}
            if not isinstance(opts, dict):
                raise HybridConfigError(f"{source}: {where}: options of {name!r} must be a mapping, got {opts!r}")
            out.append((str(name), dict(opts)))
        else:
            raise HybridConfigError(
                f"{source}: {where}: expected a string like '4 x [gdn, mlp]' or a one-key mapping "
                f"like {{swa: {{window: 1024}}}}, got {entry!r}")
    return out


def _check_value(kind, value, where, source):
    def fail(what):
        raise HybridConfigError(f"{source}: {where}: must be {what}, got {value!r}")

    if isinstance(kind, tuple):
        if value not in kind:
            fail(f"one of {list(kind)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return value
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = (is_int or isinstance(value, float)) and not isinstance(value, bool)
    if kind == "pos_int" and not (is_int and value > 0):
        fail("a positive integer")
    if kind == "nonneg_int" and not (is_int and value >= 0):
        fail("a non-negative integer")
    if kind == "pos_float" and not (is_num and value > 0 and math.isfinite(value)):
        fail("a positive number")
    if kind == "nonneg_float" and not (is_num and value >= 0 and math.isfinite(value)):
        fail("a non-negative number")
    if kind == "fraction" and not (is_num and 0 < value <= 1):
        fail("a number in (0, 1]")
    return float(value) if kind.endswith("float") or kind == "fraction" else value


def _section(raw, name, source, required):
    schema = SCHEMA[name]
    given = raw.get(name)
    if given is None:
        if required and any(d is REQUIRED for _, d in schema.values()):
            missing = [k for k, (_, d) in schema.items() if d is REQUIRED]
            raise HybridConfigError(f"{source}: {name}: section missing (needs {', '.join(missing)})")
        given = {}
    if not isinstance(given, dict):
        raise HybridConfigError(f"{source}: {name}: expected a mapping, got {given!r}")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise HybridConfigError(f"{source}: {name}.{unknown[0]}: unknown field (known: {', '.join(schema)})")
    out = {}
    for key, (kind, default) in schema.items():
        if key in given and given[key] is not None:
            out[key] = _check_value(kind, given[key], f"{name}.{key}", source)
        elif default is REQUIRED:
            if required:
                raise HybridConfigError(f"{source}: {name}.{key}: required field missing")
            out[key] = None
        else:
            out[key] = default
    return out


def parse(raw: Any, source: str = "<yaml>") -> HybridModel:
    """Validate a loaded YAML document (a dict) and plan the layers."""
    if not isinstance(raw, dict):
        raise HybridConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    known = {"name", "layers", *SCHEMA}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HybridConfigError(f"{source}: {unknown[0]}: unknown top-level field (known: {', '.join(sorted(known))})")
    if "layers" not in raw:
        raise HybridConfigError(f"{source}: layers: required field missing")
    items = parse_layers(raw["layers"], source)
    for i, (kind, opts) in enumerate(items):
        if kind not in MIXERS + FFNS:
            raise HybridConfigError(
                f"{source}: layers[{i}]: unknown layer type {kind!r} (mixers: {', '.join(MIXERS)}; "
                f"FFNs: {', '.join(FFNS)})")
        allowed = PER_LAYER.get(kind, ())
        for key in opts:
            if key not in allowed:
                raise HybridConfigError(
                    f"{source}: layers[{i}] ({kind}).{key}: not a per-layer option "
                    f"(per-layer options of {kind}: {', '.join(allowed) or 'none'})")
    used = {kind for kind, _ in items}
    needed = {s for kind in used for s in SECTIONS_OF[kind]}
    model = _section(raw, "model", source, required=True)
    sections = {}
    for name in SCHEMA:
        if name == "model":
            continue
        if name not in needed and raw.get(name) is not None:
            warnings.warn(f"{source}: section {name!r} is ignored: no layer uses it", stacklevel=2)
        sections[name] = _section(raw, name, source, required=name in needed
                                  and not (name == "swa" and all(o.get("window") for k, o in items if k == "swa")))
    _check_sizes(model, sections, needed, items, source)

    plans: List[LayerPlan] = []
    for i, (kind, opts) in enumerate(items):
        if kind in FFNS and plans and plans[-1].ffn is None and plans[-1].mixer is not None \
                and plans[-1].items[-1] == i - 1:
            last = plans[-1]
            plans[-1] = LayerPlan(last.mixer, kind, last.options, last.items + (i,))
            continue
        if kind in FFNS:
            plans.append(LayerPlan(None, kind, (), (i,)))
            continue
        options = _mixer_options(kind, opts, sections, i, source)
        plans.append(LayerPlan(kind, None, tuple(sorted(options.items())), (i,)))
    name = raw.get("name") or Path(source).stem
    return HybridModel(source=source, name=str(name), model=model, sections=sections, layers=plans)


def _mixer_options(kind, opts, sections, i, source):
    if kind == "gdn":
        g = sections["gdn"]
        return {"conv_bias": g["conv_bias"], "use_qk_l2norm": g["qk_l2norm"],
                "use_output_gate": g["output_gate"], "use_short_conv": g["short_conv"],
                "use_decay": g["decay"]}
    if kind in ("attention", "swa"):
        options = {"qk_norm": sections["attention"]["qk_norm"]}
        if kind == "swa":
            window = opts.get("window", sections["swa"]["window"])
            options["window"] = _check_value("pos_int", window, f"layers[{i}] (swa).window", source)
        return options
    if kind == "mamba2":
        return dict(sections["mamba2"])
    return {}


def _check_sizes(model, sections, needed, items, source):
    h = model["hidden_size"]
    if "gdn" in needed:
        from megatron_gdn.config import (MAX_CONV_KERNEL_DIM, MAX_KEY_HEAD_DIM, MAX_VALUE_HEAD_DIM,
                                         MIN_CONV_KERNEL_DIM)

        g = sections["gdn"]
        g["num_value_heads"] = g["num_value_heads"] or g["num_key_heads"]
        g["value_head_dim"] = g["value_head_dim"] or g["key_head_dim"]
        if g["conv_bias"] and not g["short_conv"]:
            raise HybridConfigError(f"{source}: gdn.conv_bias: true needs gdn.short_conv: true (no conv, no bias)")
        if g["num_value_heads"] % g["num_key_heads"]:
            raise HybridConfigError(
                f"{source}: gdn.num_value_heads: {g['num_value_heads']} is not a multiple of "
                f"gdn.num_key_heads ({g['num_key_heads']})")
        if g["key_head_dim"] > MAX_KEY_HEAD_DIM:
            raise HybridConfigError(f"{source}: gdn.key_head_dim: {g['key_head_dim']} > {MAX_KEY_HEAD_DIM} (kernel limit)")
        if g["value_head_dim"] > MAX_VALUE_HEAD_DIM:
            raise HybridConfigError(f"{source}: gdn.value_head_dim: {g['value_head_dim']} > {MAX_VALUE_HEAD_DIM} (kernel limit)")
        if not MIN_CONV_KERNEL_DIM <= g["conv_kernel"] <= MAX_CONV_KERNEL_DIM:
            raise HybridConfigError(
                f"{source}: gdn.conv_kernel: {g['conv_kernel']} outside [{MIN_CONV_KERNEL_DIM}, {MAX_CONV_KERNEL_DIM}]")
    if "attention" in needed:
        a = sections["attention"]
        a["num_kv_heads"] = a["num_kv_heads"] or a["num_heads"]
        if a["num_heads"] % a["num_kv_heads"]:
            raise HybridConfigError(
                f"{source}: attention.num_kv_heads: {a['num_kv_heads']} does not divide "
                f"attention.num_heads ({a['num_heads']})")
        if a["head_dim"] is None:
            if h % a["num_heads"]:
                raise HybridConfigError(
                    f"{source}: attention.head_dim: not given and hidden_size {h} is not divisible "
                    f"by attention.num_heads ({a['num_heads']})")
            a["head_dim"] = h // a["num_heads"]
        if model["position_embedding"] == "rope":
            rot = a["head_dim"] * model["rope_fraction"]
            if rot != int(rot) or int(rot) % 2:
                raise HybridConfigError(
                    f"{source}: model.rope_fraction: {model['rope_fraction']} x attention.head_dim "
                    f"{a['head_dim']} = {rot} rotary channels; must be an even integer")
    if "moe" in needed:
        m = sections["moe"]
        if m["topk"] > m["num_experts"]:
            raise HybridConfigError(
                f"{source}: moe.topk: {m['topk']} > moe.num_experts ({m['num_experts']})")
    if "mamba2" in needed:
        m = sections["mamba2"]
        inner = m["expand"] * h
        if inner % m["head_dim"]:
            raise HybridConfigError(
                f"{source}: mamba2.head_dim: {m['head_dim']} does not divide expand x hidden_size = {inner}")
        if (inner // m["head_dim"]) % m["num_groups"]:
            raise HybridConfigError(
                f"{source}: mamba2.num_groups: {m['num_groups']} does not divide the "
                f"{inner // m['head_dim']} heads")


def load(path) -> HybridModel:
    """Read and validate a YAML model description."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise HybridConfigError(f"{source}: cannot read the file ({exc})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HybridConfigError(f"{source}: not valid YAML ({exc})") from exc
    return parse(raw, source)


# ------------------------------------------------------------------------- Megatron objects
def transformer_config(hm: HybridModel, **overrides):
    """The TransformerConfig of the model; `overrides` (parallel sizes, dtypes, ...) win."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, s = hm.model, hm.sections
    kw: Dict[str, Any] = dict(
        num_layers=hm.num_layers,
        hidden_size=m["hidden_size"],
        normalization=m["normalization"],
        layernorm_epsilon=m["norm_epsilon"],
        init_method_std=m["init_std"],
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    if hm.uses("attention") or hm.uses("swa"):
        a = s["attention"]
        kw.update(num_attention_heads=a["num_heads"], num_query_groups=a["num_kv_heads"],
                  kv_channels=a["head_dim"], attention_output_gate=a["gated"],
                  qk_layernorm=a["qk_norm"])
    else:
        # unused by GDN-only stacks, but TransformerConfig requires it
        heads = s["gdn"]["num_key_heads"] if hm.uses("gdn") else 1
        kw.update(num_attention_heads=heads)
    if hm.uses("gdn"):
        g = s["gdn"]
        kw.update(linear_num_key_heads=g["num_key_heads"], linear_num_value_heads=g["num_value_heads"],
                  linear_key_head_dim=g["key_head_dim"], linear_value_head_dim=g["value_head_dim"],
                  linear_conv_kernel_dim=g["conv_kernel"])
    if hm.uses("mlp"):
        mlp = s["mlp"]
        kw.update(ffn_hidden_size=mlp["ffn_hidden_size"])
        if mlp["activation"] == "swiglu":
            kw.update(gated_linear_unit=True, activation_func=F.silu)
        else:
            kw.update(gated_linear_unit=False, activation_func=F.gelu)
    else:
        kw.update(gated_linear_unit=True, activation_func=F.silu)
    if hm.uses("moe"):
        moe = s["moe"]
        kw.update(num_moe_experts=moe["num_experts"], moe_router_topk=moe["topk"],
                  moe_ffn_hidden_size=moe["ffn_hidden_size"],
                  moe_shared_expert_intermediate_size=moe["shared_ffn_hidden_size"] or None,
                  moe_aux_loss_coeff=moe["aux_loss_coeff"],
                  moe_router_load_balancing_type="aux_loss" if moe["aux_loss_coeff"] > 0 else "none",
                  moe_token_dispatcher_type="alltoall")
        if not hm.uses("mlp"):
            kw.update(ffn_hidden_size=moe["ffn_hidden_size"])
    kw.setdefault("params_dtype", torch.float32)
    kw.update(overrides)
    if kw.get("bias_activation_fusion") and not kw["gated_linear_unit"] and not kw["add_bias_linear"]:
        # Megatron's rule (its arguments turn --bias-gelu-fusion off without linear biases):
        # the gelu fusion is a bias-gelu fusion, and these models' linears have no bias
        kw["bias_activation_fusion"] = False
    _check_parallel(hm, kw)
    return TransformerConfig(**kw)


def _check_parallel(hm: HybridModel, kw):
    tp = kw.get("tensor_model_parallel_size", 1)
    pp = kw.get("pipeline_model_parallel_size", 1)
    src = hm.source
    if hm.uses("attention") or hm.uses("swa"):
        a = hm.sections["attention"]
        if a["num_heads"] % tp:
            raise HybridConfigError(
                f"{src}: attention.num_heads: {a['num_heads']} not divisible by tensor_model_parallel_size={tp}")
    if hm.uses("gdn"):
        g = hm.sections["gdn"]
        if g["num_key_heads"] % tp:
            raise HybridConfigError(
                f"{src}: gdn.num_key_heads: {g['num_key_heads']} not divisible by tensor_model_parallel_size={tp}")
    if pp > 1 and kw.get("num_layers_in_first_pipeline_stage") is None \
            and kw.get("num_layers_in_last_pipeline_stage") is None \
            and kw.get("pipeline_model_parallel_layout") is None and hm.num_layers % pp:
        raise HybridConfigError(
            f"{src}: layers: {hm.num_layers} Megatron layers ({hm.pattern()}) not divisible by "
            f"pipeline_model_parallel_size={pp}")


def _layer_specs(hm: HybridModel):
    from megatron_gdn.hybrid.specs import hybrid_layer_spec

    num_experts = hm.sections["moe"]["num_experts"] if hm.uses("moe") else None
    specs = []
    for n, plan in enumerate(hm.layers):
        try:
            specs.append(hybrid_layer_spec(plan.mixer, plan.ffn, dict(plan.options), num_experts))
        except NotImplementedError as exc:
            raise NotImplementedError(f"{hm.source}: layers[{plan.items[0]}] ({plan.mixer}): {exc}") from exc
    return specs


def block_spec(hm: HybridModel, config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """TransformerBlockSubmodules holding the layer specs of this pipeline stage."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_gdn.hybrid.specs import norm_module

    specs = _layer_specs(hm)
    if config.num_layers != len(specs):
        raise HybridConfigError(
            f"{hm.source}: config.num_layers={config.num_layers} but the file declares {len(specs)} layers")
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        assert isinstance(layout, PipelineParallelLayerLayout)
        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        local = [specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = specs[offset:offset + count]
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=norm_module())


def build_gpt_model(hm: HybridModel, config, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None,
                    pp_rank: Optional[int] = None, parallel_output: bool = True):
    """megatron.core GPTModel of this pipeline stage (Megatron's parallel state must be set)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    m = hm.model
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(hm, config, vp_stage=vp_stage, pp_rank=pp_rank),
        vocab_size=m["vocab_size"],
        max_sequence_length=m["seq_length"],
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=m["tie_embeddings"],
        position_embedding_type=m["position_embedding"],
        rotary_percent=m["rope_fraction"],
        rotary_base=int(m["rope_base"]),
        vp_stage=vp_stage,
    )


# ---------------------------------------------------------------------- parameter counting
def count_parameters(hm: HybridModel) -> Dict[str, int]:
    """Analytic parameter count (TP=1 layout, no biases, local backend), by component.

    Keys: embedding, output (0 when tied), final_norm, one per mixer / FFN type used, norms
    (per-layer norms), total. Mamba2 follows megatron.core's MambaMixer layout (in_proj to
    [z, x, B, C, dt], conv over [x, B, C] with bias, A_log, D, dt_bias, gated norm, out_proj).
    """
    m, s = hm.model, hm.sections
    h, vocab = m["hidden_size"], m["vocab_size"]
    norm = h if m["normalization"] == "RMSNorm" else 2 * h
    out = {"embedding": vocab * h, "output": 0 if m["tie_embeddings"] else vocab * h,
           "final_norm": norm, "norms": 0}

    def mixer_params(kind):
        if kind == "gdn":
            g = s["gdn"]
            H, HV, K, V, W = (g["num_key_heads"], g["num_value_heads"], g["key_head_dim"],
                              g["value_head_dim"], g["conv_kernel"])
            conv_dim = 2 * H * K + HV * V
            # in_proj rows q, k, v, b (+ z with the output gate, + a with the decay)
            rows = 2 * H * K + HV * V + HV + (HV * V if g["output_gate"] else 0) + (HV if g["decay"] else 0)
            conv = conv_dim * W + (conv_dim if g["conv_bias"] else 0) if g["short_conv"] else 0
            return h * rows + conv + (2 * HV if g["decay"] else 0) + V + HV * V * h
        if kind in ("attention", "swa"):
            a = s["attention"]
            q, kv = a["num_heads"] * a["head_dim"], a["num_kv_heads"] * a["head_dim"]
            qkv = h * (q + 2 * kv + (q if a["gated"] else 0))
            per_norm = a["head_dim"] * (1 if m["normalization"] == "RMSNorm" else 2)
            return qkv + q * h + (2 * per_norm if a["qk_norm"] else 0)
        if kind == "mamba2":
            mb = s["mamba2"]
            inner = mb["expand"] * h
            heads = inner // mb["head_dim"]
            gs = mb["num_groups"] * mb["state_dim"]
            conv_dim = inner + 2 * gs
            return (h * (2 * inner + 2 * gs + heads) + conv_dim * (mb["conv_kernel"] + 1)
                    + 3 * heads + inner + inner * h)
        raise AssertionError(kind)

    def ffn_params(kind):
        if kind == "mlp":
            f = s["mlp"]["ffn_hidden_size"]
            return h * f * (3 if s["mlp"]["activation"] == "swiglu" else 2)
        moe = s["moe"]
        e, f, fs = moe["num_experts"], moe["ffn_hidden_size"], moe["shared_ffn_hidden_size"]
        return h * e + e * 3 * h * f + 3 * h * fs

    for plan in hm.layers:
        if plan.mixer:
            out[plan.mixer] = out.get(plan.mixer, 0) + mixer_params(plan.mixer)
            out["norms"] += norm
        if plan.ffn:
            out[plan.ffn] = out.get(plan.ffn, 0) + ffn_params(plan.ffn)
            out["norms"] += norm
    out["total"] = sum(out.values())
    return out


def _format_count(hm: HybridModel, counts: Dict[str, int]) -> str:
    lines = [f"{hm.name}: {hm.num_layers} Megatron layers, {counts['total']:,} parameters "
             f"({counts['total'] / 1e9:.3f} B)"]
    for key, value in counts.items():
        if key != "total":
            lines.append(f"  {key:<12} {value:>15,}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="YAML model descriptions")
    parser.add_argument("--count", action="store_true", help="print the analytic parameter count")
    parser.add_argument("--layers", action="store_true", help="print the Megatron layer plan")
    args = parser.parse_args(argv)
    for path in args.files:
        try:
            hm = load(path)
        except HybridConfigError as exc:
            print(f"error: {exc}")
            return 2
        print(_format_count(hm, count_parameters(hm)) if args.count or not args.layers else hm.name)
        if args.layers:
            for n, plan in enumerate(hm.layers):
                print(f"  layer {n + 1:>3}: {plan.mixer or '-':<9} {plan.ffn or '-':<4} {dict(plan.options)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
