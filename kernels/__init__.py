"""megatron_gdn.kernels: the local computation of Gated DeltaNet (torch + triton only).

Layout legend used across this package:
    B batch, T tokens, H key heads, HV value heads (HV % H == 0, GVA), K key dim, V value dim,
    N sequences (rows of the state; N == B, or len(cu_seqlens) - 1 for packed input).

This package must not import Megatron (a test enforces it).
"""

from .conv1d import causal_conv1d, causal_conv1d_update
from .gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)
from .gated_norm import gated_rmsnorm

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_rmsnorm",
    "naive_recurrent_gated_delta_rule",
]
