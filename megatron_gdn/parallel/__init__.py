"""Context parallelism for the Gated DeltaNet layer: state passing between zigzag pieces.

    zigzag.py            Megatron's CP layout (dense rows, packed THD) as index arithmetic
    collectives.py       the all-gather / reduce-scatter used below
    halo.py              short conv with the halo of the preceding pieces (forward, backward)
    context_parallel.py  chunk_gated_delta_rule over the CP group (affine summaries, one
                         all-gather per direction, fold, local kernel)
    bound.py             both kernels with the CP layout bound in, for the layer's forward
"""
from .bound import cp_kernels
from .context_parallel import chunk_gated_delta_rule_cp, segment_maps
from .halo import conv_with_cp_halo
from .zigzag import CPLayout, layout_for_layer, zigzag_indices, zigzag_shard, zigzag_unshard

__all__ = [
    "CPLayout",
    "chunk_gated_delta_rule_cp",
    "conv_with_cp_halo",
    "cp_kernels",
    "layout_for_layer",
    "segment_maps",
    "zigzag_indices",
    "zigzag_shard",
    "zigzag_unshard",
]
