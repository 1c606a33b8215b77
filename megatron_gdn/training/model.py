"""The model provider for `megatron.training.pretrain`: a megatron.core GPTModel whose layers
are Gated DeltaNet (+ MLP / MoE), or any hybrid stack declared in a YAML model file.

Two ways to describe the model:
- Megatron's own flags: `--num-layers`, `--hidden-size`, `--ffn-hidden-size`, `--swiglu`,
  `--normalization`, and the GDN sizes `--linear-num-key-heads`, `--linear-num-value-heads`,
  `--linear-key-head-dim`, `--linear-value-head-dim`, `--linear-conv-kernel-dim`; every layer is
  `megatron_gdn.specs.get_gdn_layer_spec(backend)`.
- `--model-yaml FILE` (megatron_gdn.hybrid.yaml_loader): the file fixes the model's shape; the
  flags still set everything about how it runs (parallel sizes, precision, recomputation).
  `yaml_megatron_args` turns the file into the shape flags Megatron's argument checks, FLOPs
  counter and checkpoint metadata need, and the provider builds the TransformerConfig from the
  file with the run-time fields of `core_transformer_config_from_args` (`RUNTIME_FIELDS`).
"""
from __future__ import annotations

from typing import List, Optional

__all__ = ["model_provider", "yaml_megatron_args", "RUNTIME_FIELDS", "set_model_source"]

# TransformerConfig fields that describe how the model runs rather than what it is: taken from
# the command line even when the shape comes from a YAML file.
RUNTIME_FIELDS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "context_parallel_size", "sequence_parallel",
    "expert_model_parallel_size", "expert_tensor_parallel_size",
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "pipeline_model_parallel_layout", "params_dtype", "fp16", "bf16", "pipeline_dtype",
    "autocast_dtype", "gradient_accumulation_fusion", "use_cpu_initialization",
    "perform_initialization", "init_model_with_meta_device", "recompute_granularity",
    "recompute_method", "recompute_num_layers", "distribute_saved_activations",
    "calculate_per_token_loss", "deallocate_pipeline_outputs", "variable_seq_lengths",
    "batch_p2p_comm", "overlap_p2p_comm", "cp_comm_type", "hidden_dropout", "attention_dropout",
    "moe_token_dispatcher_type", "moe_grouped_gemm", "moe_router_dtype",
    # Megatron's fusions (its defaults on a GPU: the compiled SwiGLU and bias-dropout-add; the
    # CPU flags and the GPU fallback flags turn off those a machine cannot run)
    "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
    "persist_layer_norm", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
)

# set by the entry script before pretrain(): (backend, HybridModel or None)
_SOURCE = {"backend": "local", "hybrid": None}


def set_model_source(backend: str = "local", hybrid=None) -> None:
    """Choose the layer backend ("local" or "te") and, optionally, a loaded YAML model."""
    if backend not in ("local", "te"):
        raise ValueError(f"--gdn-backend {backend!r}: expected 'local' or 'te'")
    _SOURCE["backend"], _SOURCE["hybrid"] = backend, hybrid


def yaml_megatron_args(hm, user_argv: List[str]) -> List[str]:
    """Megatron shape flags implied by a loaded YAML model (`hm`); a flag the user also passes
    is left out so the command line wins where Megatron allows a choice (e.g. --seq-length)."""
    m, s = hm.model, hm.sections
    given = {a.split("=")[0] for a in user_argv if a.startswith("--")}
    seq_length = m["seq_length"]
    for i, a in enumerate(user_argv):
        if a == "--seq-length" and i + 1 < len(user_argv) and user_argv[i + 1].isdigit():
            seq_length = max(seq_length, int(user_argv[i + 1]))
    flags = {
        "--num-layers": hm.num_layers,
        "--hidden-size": m["hidden_size"],
        "--seq-length": m["seq_length"],
        # a longer --seq-length than the file's needs a position table (RoPE) that long
        "--max-position-embeddings": seq_length,
        "--normalization": m["normalization"],
        "--norm-epsilon": m["norm_epsilon"],
        "--position-embedding-type": m["position_embedding"],
        "--rotary-percent": m["rope_fraction"],
        "--rotary-base": int(m["rope_base"]),
        "--init-method-std": m["init_std"],
        # the YAML models train without dropout (Megatron's flag default is 0.1)
        "--hidden-dropout": 0.0,
        "--attention-dropout": 0.0,
    }
    if hm.uses("attention") or hm.uses("swa"):
        a = s["attention"]
        flags["--num-attention-heads"] = a["num_heads"]
        flags["--kv-channels"] = hm.attention_head_dim
        if a["num_kv_heads"] and a["num_kv_heads"] != a["num_heads"]:
            flags["--group-query-attention"] = None
            flags["--num-query-groups"] = a["num_kv_heads"]
    else:
        # unused by the layers, but Megatron's checks want it to divide the hidden size (the
        # GDN 1.3B preset's 6 key heads do not divide 2048)
        first = [s["gdn"]["num_key_heads"]] if hm.uses("gdn") else []
        flags["--num-attention-heads"] = next(
            n for n in first + [16, 32, 8, 64, 4, 2, 1] if m["hidden_size"] % n == 0)
    if hm.uses("gdn"):
        g = s["gdn"]
        flags.update({
            "--linear-num-key-heads": g["num_key_heads"],
            "--linear-num-value-heads": g["num_value_heads"] or g["num_key_heads"],
            "--linear-key-head-dim": g["key_head_dim"],
            "--linear-value-head-dim": g["value_head_dim"] or g["key_head_dim"],
            "--linear-conv-kernel-dim": g["conv_kernel"],
        })
    if hm.uses("mlp"):
        flags["--ffn-hidden-size"] = s["mlp"]["ffn_hidden_size"]
        if s["mlp"]["activation"] == "swiglu":
            flags["--swiglu"] = None
    elif hm.uses("moe"):
        flags["--ffn-hidden-size"] = s["moe"]["ffn_hidden_size"]
    if hm.uses("moe"):
        moe = s["moe"]
        flags["--num-experts"] = moe["num_experts"]
        flags["--moe-router-topk"] = moe["topk"]
        flags["--moe-ffn-hidden-size"] = moe["ffn_hidden_size"]
    if not m["tie_embeddings"]:
        flags["--untie-embeddings-and-output-weights"] = None
    out: List[str] = []
    for flag, value in flags.items():
        if flag in given:
            continue
        out.append(flag)
        if value is not None:
            out.append(str(value))
    return out


def _config_from_args(args):
    from megatron.training.argument_utils import core_transformer_config_from_args

    config = core_transformer_config_from_args(args)
    hm = _SOURCE["hybrid"]
    if hm is None:
        return config
    from megatron_gdn.hybrid import yaml_loader

    overrides = {f: getattr(config, f) for f in RUNTIME_FIELDS if hasattr(config, f)}
    if len({(p.mixer, p.ffn) for p in hm.layers}) > 1:
        # layers of different types have different parameters: dist-checkpointing must key
        # them per layer instead of stacking `decoder.layers.*` along a layer axis (a stacked
        # key that only some layers have fails the sharding validation on save)
        overrides["hetereogenous_dist_checkpoint"] = True
    return yaml_loader.transformer_config(hm, **overrides)


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, pg_collection=None):
    """GPTModel of this pipeline stage (signature of megatron.training's model_provider)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args

    from megatron_gdn.specs import get_gdn_layer_spec

    args = get_args()
    config = _config_from_args(args)
    hm = _SOURCE["hybrid"]
    if hm is None:
        layer_spec = get_gdn_layer_spec(
            _SOURCE["backend"], num_experts=args.num_experts,
            moe_grouped_gemm=bool(args.moe_grouped_gemm),
        )
    else:
        from megatron_gdn.hybrid import yaml_loader

        layer_spec = yaml_loader.block_spec(hm, config, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
