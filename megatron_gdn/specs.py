"""Layer specs that put GatedDeltaNet in a Megatron TransformerLayer (GDN mixer + MLP).

    get_gdn_mixer_spec(backend)   the ModuleSpec of the mixer alone (for hybrid stacks)
    get_gdn_layer_spec(backend)   the TransformerLayer ModuleSpec: norm -> GDN -> norm -> MLP/MoE
    gdn_layer_spec                get_gdn_layer_spec("local"), for Megatron's `--spec` flag:

        --spec megatron_gdn.specs gdn_layer_spec

`--spec` imports an attribute by name and hands it to the GPT builder as the layer spec
(megatron-core 0.19.2's megatron.training accepts a ModuleSpec or a function of the model
config; Megatron-LM's pretrain_gpt.py uses it as a ModuleSpec), so `gdn_layer_spec` is a
ModuleSpec. Head counts and dims come from the config's `linear_*` fields at build time.

Backends:
- "local": megatron-core's own ColumnParallelLinear / RowParallelLinear, runs anywhere (CPU
  included). Norms: apex's FusedLayerNorm when apex is installed, else a torch norm whose
  weights are marked for sequence parallel (Megatron's WrappedTorchNorm refuses SP).
- "te": Transformer Engine through Megatron's TESpecProvider, with the input norm fused into
  in_proj (TELayerNormColumnParallelLinear) and the pre-MLP norm fused into fc1.
"""
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_gdn.layer import GatedDeltaNet, GatedDeltaNetSubmodules

_BACKENDS = ("local", "te")


def _te_provider():
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    except ImportError as exc:
        raise ValueError(
            f"backend='te' needs Transformer Engine, which cannot be imported here ({exc}); "
            "use backend='local'"
        ) from exc
    return TESpecProvider()


def _local_norm():
    """apex's fused norm when available (it supports SP); otherwise a torch norm marked for SP."""
    try:
        import apex  # noqa: F401
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
        return FusedLayerNorm
    except ImportError:
        from megatron_gdn.cpu import TorchNorm
        return TorchNorm


def _provider(backend: str):
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {_BACKENDS}")
    return _te_provider() if backend == "te" else LocalSpecProvider()


def get_gdn_mixer_spec(backend: str = "local", **gdn_params) -> ModuleSpec:
    """ModuleSpec of the GatedDeltaNet mixer. `gdn_params` go to GatedDeltaNet's constructor
    (conv_bias, proj_bias, use_qk_l2norm, use_output_gate, use_short_conv, use_decay,
    A_init_range, dt_init_range, dt_init_floor, cp_packed_layout). With
    backend "te" the input norm is fused into in_proj: the surrounding layer must then use
    IdentityOp as its input_layernorm (get_gdn_layer_spec does)."""
    provider = _provider(backend)
    in_proj = (provider.column_parallel_layer_norm_linear() if backend == "te"
               else provider.column_parallel_linear())
    return ModuleSpec(
        module=GatedDeltaNet,
        params=dict(gdn_params),
        submodules=GatedDeltaNetSubmodules(in_proj=in_proj, out_proj=provider.row_parallel_linear()),
        metainfo={"fuse_input_layernorm": backend == "te"},
    )


def get_gdn_layer_spec(
    backend: str = "local",
    *,
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    **gdn_params,
) -> ModuleSpec:
    """TransformerLayer ModuleSpec: input norm -> GatedDeltaNet -> residual -> pre-MLP norm ->
    MLP (or MoE with `num_experts`) -> residual. `gdn_params`: see get_gdn_mixer_spec."""
    provider = _provider(backend)
    mixer = get_gdn_mixer_spec(backend, **gdn_params)
    mlp = get_mlp_module_spec_for_backend(
        backend=provider, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm
    )
    if backend == "te":
        input_norm = IdentityOp
        # a dense MLP fuses its norm into fc1 (TELayerNormColumnParallelLinear); MoE does not
        pre_mlp_norm = provider.layer_norm() if num_experts is not None else IdentityOp
    else:
        input_norm = pre_mlp_norm = _local_norm()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


gdn_layer_spec = get_gdn_layer_spec("local")
