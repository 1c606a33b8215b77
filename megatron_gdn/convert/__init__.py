"""Checkpoint interop: Hugging Face Qwen3-Next and fla GatedDeltaNet <-> megatron-gdn.

    python -m megatron_gdn.convert import-hf  SRC_DIR OUT_DIR [--dist]
    python -m megatron_gdn.convert export-hf  CKPT_DIR OUT_DIR

Every tensor's mapping is a table (qwen3_next.rules, fla_gdn.rules); anything unmapped,
missing or mis-shaped is a ConversionError naming the tensor. A converted checkpoint is a
directory (checkpoint_io): the YAML model file, a TP=1 state dict, optionally a Megatron
distributed checkpoint loadable at any TP / PP.
"""
from megatron_gdn.convert.checkpoint_io import build_model, read, save_dist, single_process, write
from megatron_gdn.convert.mapping import ConversionError, Rule, Transform, convert

__all__ = ["ConversionError", "Rule", "Transform", "convert", "build_model", "read", "save_dist",
           "single_process", "write"]
