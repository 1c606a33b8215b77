"""TransformerLayer specs for hybrid stacks: one Megatron layer = [norm -> mixer] + [norm -> FFN].

    mixer: "gdn" (megatron_gdn.layer.GatedDeltaNet), "attention" (causal softmax attention),
           "swa" (sliding-window attention), "mamba2" (megatron_gdn.mamba2.Mamba2Mixer), or None
    ffn:   "mlp" (Megatron's MLP), "moe" (Megatron's MoELayer), or None

Attention layers are Megatron's own SelfAttention (fused QKV column-parallel projection, RoPE,
optional q/k norm and sigmoid output gate from the TransformerConfig, row-parallel output
projection) with `megatron_gdn.hybrid.attention.SDPACoreAttention` as the core, so TP, SP,
dist-checkpointing and the attention sharded-state-dict layout are Megatron's. A layer without
a mixer (or without an FFN) gets Megatron's identity ops in those slots, as its own hybrid
stacks do. Backend: Megatron's local linears (ColumnParallelLinear / RowParallelLinear).
"""
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_gdn.hybrid.attention import SDPACoreAttention

__all__ = ["MIXERS", "FFNS", "norm_module", "attention_mixer_spec", "hybrid_layer_spec"]

MIXERS = ("gdn", "attention", "swa", "mamba2")
FFNS = ("mlp", "moe")


def norm_module():
    """apex's fused norm when installed (it supports SP), else a torch norm whose weights are
    marked for sequence parallel (Megatron's WrappedTorchNorm refuses SP)."""
    try:
        import apex  # noqa: F401
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
        return FusedLayerNorm
    except ImportError:
        from megatron_gdn.cpu import TorchNorm
        return TorchNorm


def attention_mixer_spec(window: Optional[int] = None, qk_norm: bool = False) -> ModuleSpec:
    """Megatron SelfAttention with our core (window None: full causal attention)."""
    provider = LocalSpecProvider()
    qk = norm_module() if qk_norm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=ModuleSpec(module=SDPACoreAttention, params={"window": window}),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=qk,
            k_layernorm=qk,
        ),
    )


def _mixer_spec(mixer: str, options: dict):
    if mixer == "gdn":
        from megatron_gdn.specs import get_gdn_mixer_spec

        return get_gdn_mixer_spec("local", **options)
    if mixer == "attention":
        return attention_mixer_spec(None, qk_norm=options.get("qk_norm", False))
    if mixer == "swa":
        return attention_mixer_spec(options["window"], qk_norm=options.get("qk_norm", False))
    if mixer == "mamba2":
        from megatron_gdn.mamba2 import get_mamba2_mixer_spec

        return get_mamba2_mixer_spec(**options)
    raise ValueError(f"mixer={mixer!r}: expected one of {MIXERS} or None")


def hybrid_layer_spec(mixer: Optional[str], ffn: Optional[str], mixer_options: Optional[dict] = None,
                      num_experts: Optional[int] = None) -> ModuleSpec:
    """One TransformerLayer: input norm -> mixer -> residual -> pre-FFN norm -> FFN -> residual.

    mixer_options: for "gdn" GatedDeltaNet keyword arguments (conv_bias, use_qk_l2norm, ...);
    for "attention" / "swa" {"qk_norm": bool} and, for "swa", {"window": int}.
    num_experts: required for ffn == "moe".
    """
    if mixer is None and ffn is None:
        raise ValueError("a layer needs a mixer, an FFN or both")
    if ffn not in (None,) + FFNS:
        raise ValueError(f"ffn={ffn!r}: expected one of {FFNS} or None")
    norm = norm_module()
    mixer_spec = IdentityOp if mixer is None else _mixer_spec(mixer, dict(mixer_options or {}))
    if ffn is None:
        ffn_spec = IdentityOp
    elif ffn == "mlp":
        ffn_spec = get_mlp_module_spec_for_backend(backend=LocalSpecProvider(), num_experts=None)
    else:
        if not num_experts:
            raise ValueError(f"ffn='moe' needs num_experts, got {num_experts!r}")
        ffn_spec = get_mlp_module_spec_for_backend(backend=LocalSpecProvider(),
                                                   num_experts=num_experts, moe_grouped_gemm=False)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm if mixer is not None else IdentityOp,
            self_attention=mixer_spec,
            self_attn_bda=get_bias_dropout_add if mixer is not None else IdentityFuncOp,
            pre_mlp_layernorm=norm if ffn is not None else IdentityOp,
            mlp=ffn_spec,
            mlp_bda=get_bias_dropout_add if ffn is not None else IdentityFuncOp,
        ),
    )
