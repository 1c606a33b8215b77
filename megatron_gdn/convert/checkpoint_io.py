"""A converted checkpoint on disk, and the GPTModel it builds.

    <dir>/model.yaml      the YAML model file (megatron_gdn.hybrid format)
    <dir>/convert.json    source format, and TransformerConfig overrides the YAML format cannot
                          express yet (e.g. moe_shared_expert_gate for Qwen3-Next)
    <dir>/model_tp1.pt    plain state dict of the TP=1, PP=1 GPTModel built from model.yaml
    <dir>/megatron/       (optional) Megatron distributed checkpoint (torch_dist) of the same
                          model: its sharded_state_dict splits fused tensors into sections, so it
                          loads at any TP / PP size

`build_model` works in whatever Megatron parallel state is current: at TP = PP = 1 it loads the
plain state dict, otherwise the distributed checkpoint. `single_process()` sets up a one-process
gloo group and Megatron's parallel state (and the CPU patches on a machine without a GPU).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from megatron_gdn.convert.mapping import ConversionError, check_model_keys

__all__ = ["write", "read", "build_model", "save_dist", "single_process", "YAML_NAME", "META_NAME",
           "STATE_NAME", "DIST_NAME"]

YAML_NAME, META_NAME, STATE_NAME, DIST_NAME = "model.yaml", "convert.json", "model_tp1.pt", "megatron"


def write(out_dir, yaml_doc: Mapping[str, Any], overrides: Mapping[str, Any], state: Mapping[str, torch.Tensor],
          source: str) -> Path:
    """Writes model.yaml, convert.json and model_tp1.pt into out_dir (created)."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# converted from {source} by megatron_gdn.convert\n"
    (out / YAML_NAME).write_text(header + yaml.safe_dump(dict(yaml_doc), sort_keys=False))
    (out / META_NAME).write_text(json.dumps({"source": source, "config_overrides": dict(overrides)}, indent=2) + "\n")
    torch.save({k: v.detach().clone() for k, v in state.items()}, out / STATE_NAME)
    return out


def read(ckpt_dir) -> Tuple[Any, Dict[str, Any]]:
    """(HybridModel, config overrides) of a converted checkpoint directory."""
    from megatron_gdn.hybrid import yaml_loader as yl

    d = Path(ckpt_dir)
    if not (d / YAML_NAME).is_file():
        raise ValueError(f"ckpt_dir={str(ckpt_dir)!r}: no {YAML_NAME} (not a converted checkpoint)")
    meta = json.loads((d / META_NAME).read_text()) if (d / META_NAME).is_file() else {}
    return yl.load(d / YAML_NAME), dict(meta.get("config_overrides", {}))


def single_process(seed: int = 1234) -> None:
    """One-process torch.distributed (gloo) + Megatron parallel state (TP = PP = 1); idempotent."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_gdn import cpu

    cpu.enable()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from megatron_gdn.testing.dist import free_port

            os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        model_parallel_cuda_manual_seed(seed)


def _parallel_sizes() -> Tuple[int, int]:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())


def build_model(ckpt_dir, load: bool = True, **config_kwargs):
    """The GPTModel of a converted checkpoint for the current parallel state, weights loaded.

    config_kwargs go to TransformerConfig (after convert.json's overrides), e.g. params_dtype."""
    from megatron.core import dist_checkpointing

    from megatron_gdn.hybrid import yaml_loader as yl

    hm, overrides = read(ckpt_dir)
    tp, pp = _parallel_sizes()
    kw = dict(overrides, use_cpu_initialization=True, tensor_model_parallel_size=tp,
              pipeline_model_parallel_size=pp)
    kw.update(config_kwargs)
    config = yl.transformer_config(hm, **kw)
    model = yl.build_gpt_model(hm, config)
    if not load:
        return model
    d = Path(ckpt_dir)
    if tp == 1 and pp == 1 and (d / STATE_NAME).is_file():
        state = torch.load(d / STATE_NAME, map_location="cpu", weights_only=True)
        check_model_keys(state, model.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    elif (d / DIST_NAME).is_dir():
        from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
        from megatron.core.dist_checkpointing.mapping import (ShardedTensorFactory, apply_factories,
                                                              apply_factory_merges)

        sharded = _tensors_only(model)
        factories, _ = extract_matching_values(sharded, lambda x: isinstance(x, ShardedTensorFactory))
        apply_factories(sharded)
        loaded = dist_checkpointing.load(_per_layer_keys(sharded), str(d / DIST_NAME))
        model.load_state_dict(apply_factory_merges(loaded, factories), strict=False)
    else:
        raise ConversionError(
            f"{ckpt_dir}: TP={tp}, PP={pp} needs the distributed checkpoint {DIST_NAME}/ "
            "(write it with `python -m megatron_gdn.convert ... --dist`)")
    return model


def save_dist(ckpt_dir, model: Optional[torch.nn.Module] = None) -> Path:
    """Writes <ckpt_dir>/megatron (torch_dist) from `model` or from the TP=1 state dict."""
    from megatron.core import dist_checkpointing

    if model is None:
        model = build_model(ckpt_dir)
    path = Path(ckpt_dir) / DIST_NAME
    path.mkdir(parents=True, exist_ok=True)
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sharded = _tensors_only(model)
    apply_factories(sharded)
    dist_checkpointing.save(_per_layer_keys(sharded), str(path))
    return path


def _per_layer_keys(sharded):
    """Megatron stacks the layers of a block into one ShardedTensor per parameter name with a
    prepended layer axis; in a hybrid stack a parameter exists in only some layers, so that
    stack has holes and validation rejects it. Key every layer's tensor on its own instead
    (`decoder.layers.<global index>.…`): still TP / PP independent, since the index is global."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        if isinstance(x, ShardedTensor) and x.prepend_axis_num >= 1 and x.key.startswith("decoder.layers."):
            layer = x.global_offset[0]
            return replace(x, key=x.key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1),
                           global_shape=x.global_shape[1:], global_offset=x.global_offset[1:],
                           axis_fragmentations=x.axis_fragmentations[1:] if x.axis_fragmentations else None,
                           prepend_axis_num=x.prepend_axis_num - 1)
        return x

    return fix(sharded)


def _tensors_only(model):
    """The model's sharded state dict without the linears' `_extra_state` objects: they are
    None for Megatron's local linears, and in a hybrid stack a module type present in only some
    layers leaves the per-layer object shards of the other layers missing, which dist
    checkpointing's validation rejects."""
    return {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
