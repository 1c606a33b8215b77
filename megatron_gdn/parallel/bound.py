"""The layer's two sequence kernels with context parallelism bound in, same call signatures.

GatedDeltaNet's forward calls `causal_conv1d` and `chunk_gated_delta_rule`; under context
parallelism it calls the pair returned by `cp_kernels` instead, so its forward keeps reading
like the block diagram. The returned functions take and ignore `cu_seqlens` (the CP layout
already knows the sequences, from the GLOBAL cu_seqlens Megatron passes) and return no states.
"""
from typing import Callable, Tuple

from .context_parallel import chunk_gated_delta_rule_cp
from .halo import conv_with_cp_halo
from .zigzag import layout_for_layer

__all__ = ["cp_kernels"]


def cp_kernels(packed_seq_params, batch: int, local_len: int, cp_group,
               packed_layout: str = "auto") -> Tuple[Callable, Callable]:
    """(conv, chunk) for this rank's zigzag share [local_len, batch, ...] of the sequences.

    packed_layout: how a packed THD batch was split over the CP ranks (see CPLayout.packed):
    "per_document", "whole_pack", or "auto" (per document when every document length is a
    multiple of 2 * cp_size, else whole pack).

    conv(x [B, T, D], weight, bias, activation, cu_seqlens=None) -> (y, None)
    chunk(q, k, v, g, beta, scale=None, cu_seqlens=None, **fused_options) -> (o, None)
    Raises ValueError for layouts that cannot be split (see zigzag.CPLayout).
    """
    layout = layout_for_layer(packed_seq_params, batch, local_len, cp_group, packed_layout)

    def conv(x, weight, bias=None, activation="silu", cu_seqlens=None):
        return conv_with_cp_halo(x, weight, bias, activation, layout, cp_group), None

    def chunk(q, k, v, g, beta, scale=None, cu_seqlens=None, **fused):
        return chunk_gated_delta_rule_cp(q, k, v, g, beta, layout, cp_group, scale, **fused), None

    return conv, chunk
