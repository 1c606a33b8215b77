"""Distributed-checkpoint helpers: split a fused, TP-sharded tensor into named sections.

A fused per-rank tensor such as in_proj's weight holds [q_r | k_r | v_r | z_r | b_r | a_r] on
rank r, so the concatenation over ranks is not the TP=1 layout [q | k | v | z | b | a]. Saving
each section as its own ShardedTensor (key `<name>.q`, `<name>.k`, ...), sharded over TP along
the same dim, makes the checkpoint independent of the TP size: loading at another TP size is a
plain re-slicing of every section.
"""
from dataclasses import replace
from typing import Optional, Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def split_sharded_tensor(
    sharded: ShardedTensor, names: Sequence[str], sizes: Sequence[int], dim: int = 0
) -> ShardedTensorFactory:
    """Replaces `sharded` (local tensor split along `dim` into `sizes`) by one ShardedTensor per
    section named `<key>.<name>`; on load the sections are concatenated back in order."""
    if not isinstance(sharded, ShardedTensor):
        raise TypeError(f"sharded must be a ShardedTensor, got {type(sharded).__name__}")
    if len(names) != len(sizes):
        raise ValueError(f"names ({len(names)}) and sizes ({len(sizes)}) must have the same length")
    if sum(sizes) != sharded.local_shape[dim]:
        raise ValueError(
            f"sizes {list(sizes)} sum to {sum(sizes)}, but {sharded.key} has "
            f"{sharded.local_shape[dim]} entries along dim {dim}"
        )
    template = sharded.without_data()

    @torch.no_grad()
    def build(key: str, data: torch.Tensor, replica_id, flattened_range: Optional[slice]):
        whole = replace(template, key=key, data=data, dtype=data.dtype, replica_id=replica_id,
                        flattened_range=flattened_range)
        parts = []
        start = 0
        for name, size in zip(names, sizes):
            for piece in whole.narrow(dim, start, size):
                piece.key = f"{key}.{name}"
                parts.append(piece)
            start += size
        return parts

    def merge(parts):
        return torch.cat(parts, dim=dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
