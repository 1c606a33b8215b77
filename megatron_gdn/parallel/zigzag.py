"""Megatron's load-balanced ("zigzag") context-parallel layout, as index arithmetic.

Legend: W context-parallel size, r this rank, N sequences, P_n piece length of sequence n,
L_n (padded) length of sequence n, T_local tokens on one rank.

Megatron cuts every sequence into 2W equal pieces and gives rank r the pieces r and 2W-1-r:

- dense input ([s, b, h], no packed_seq_params; `get_batch_on_this_cp_rank`, per-sequence
  balancing): each of the b rows is one sequence of length s * W; rank r holds, per row,
  piece r followed by piece 2W-1-r.
- packed THD input (batch 1, `PackedSeqParams`; per-document balancing through Transformer
  Engine's `thd_get_partitioned_indices`): every sequence n of padded length L_n (a multiple of
  2W) is cut into 2W pieces of P_n = L_n / 2W tokens; rank r holds, for each sequence in order,
  its piece r then its piece 2W-1-r, so the local stream is
  [seq0 piece r | seq0 piece 2W-1-r | seq1 piece r | ...]. The layer receives the GLOBAL
  `cu_seqlens_q_padded` (Megatron leaves the metadata unsharded), ending at W * T_local.

`CPLayout` turns either description into the same thing: the local stream flattened to one
packed row of 2N "segments" (each one global piece) with its local boundaries, plus the map
from each global piece to the rank and local slot that hold it. Everything here is python
integers: the layout is known on every rank without communication.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["CPLayout", "layout_for_layer", "zigzag_indices", "zigzag_shard", "zigzag_unshard"]


def piece_owner(piece: int, cp_size: int) -> Tuple[int, int]:
    """(rank, local slot 0/1) holding piece `piece` of a sequence cut into 2 * cp_size pieces."""
    if piece < cp_size:
        return piece, 0
    return 2 * cp_size - 1 - piece, 1


@dataclass(frozen=True)
class CPLayout:
    """The zigzag layout of one rank's local tokens.

    Attributes:
        cp_size, cp_rank: W and r.
        seq_lens: global (padded) length L_n of every sequence, identical on all ranks.
        batch: rows of the local input (dense: b; packed: 1).
    Derived (properties): piece_lens P_n, local_cu (segment boundaries of the flattened local
    stream, 2N + 1 entries), global_cu.
    """

    cp_size: int
    cp_rank: int
    seq_lens: Tuple[int, ...]
    batch: int

    # ---------------------------------------------------------------- constructors
    @classmethod
    def dense(cls, batch: int, local_len: int, cp_size: int, cp_rank: int) -> "CPLayout":
        """b rows, each one sequence of W * local_len tokens (Megatron's [s/W, b, h] input)."""
        _check_sizes(cp_size, cp_rank)
        if local_len % 2 != 0:
            raise ValueError(
                f"the local sequence length {local_len} must be even: it holds two zigzag pieces "
                f"(the global length {local_len * cp_size} must be divisible by 2 * "
                f"context_parallel_size = {2 * cp_size})"
            )
        return cls(cp_size, cp_rank, tuple([local_len * cp_size] * batch), batch)

    @classmethod
    def packed(cls, cu_seqlens_global, local_tokens: int, cp_size: int, cp_rank: int) -> "CPLayout":
        """Packed THD input (batch 1) described by the GLOBAL (padded) cu_seqlens."""
        _check_sizes(cp_size, cp_rank)
        cu = _as_list(cu_seqlens_global)
        if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
        if cu[-1] != local_tokens * cp_size:
            raise ValueError(
                f"cu_seqlens[-1]={cu[-1]} must equal context_parallel_size * local tokens = "
                f"{cp_size} * {local_tokens}: with context parallelism the layer expects the "
                "global (padded) cu_seqlens of the whole pack"
            )
        lens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
        for n, length in enumerate(lens):
            if length % (2 * cp_size) != 0:
                raise ValueError(
                    f"packed sequence {n} has (padded) length {length}, not divisible by 2 * "
                    f"context_parallel_size = {2 * cp_size}; pad every sequence to a multiple "
                    "of it (cu_seqlens_q_padded)"
                )
        return cls(cp_size, cp_rank, lens, 1)

    # -------------------------------------------------------------------- derived
    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_segments(self) -> int:
        """Local segments: two per sequence (pieces r and 2W-1-r), empty ones included."""
        return 2 * self.num_seqs

    @property
    def piece_lens(self) -> Tuple[int, ...]:
        return tuple(length // (2 * self.cp_size) for length in self.seq_lens)

    @property
    def local_tokens(self) -> int:
        return 2 * sum(self.piece_lens)

    @property
    def local_cu(self) -> List[int]:
        """Boundaries of the 2N local segments in the flattened local stream."""
        cu = [0]
        for p in self.piece_lens:
            cu += [cu[-1] + p, cu[-1] + 2 * p]
        return cu

    @property
    def global_cu(self) -> List[int]:
        cu = [0]
        for length in self.seq_lens:
            cu.append(cu[-1] + length)
        return cu

    def local_pieces(self, rank: Optional[int] = None) -> Tuple[int, int]:
        r = self.cp_rank if rank is None else rank
        return r, 2 * self.cp_size - 1 - r

    def segment_index(self, rank: int, seq: int, slot: int) -> int:
        """Row of (rank, sequence, slot) in an all-gathered [W * 2N, ...] tensor."""
        return (rank * self.num_seqs + seq) * 2 + slot

    def local_cu_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.local_cu, dtype=torch.int32, device=device)


def layout_for_layer(packed_seq_params, batch: int, local_len: int, cp_group) -> CPLayout:
    """The CPLayout of a layer input [local_len, batch, h] on this rank of `cp_group`: packed THD
    when packed_seq_params has qkv_format 'thd' (batch 1; cu_seqlens_q_padded, else
    cu_seqlens_q, global as Megatron passes them), dense rows otherwise."""
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", "thd") != "thd":
        return CPLayout.dense(batch, local_len, cp_size, cp_rank)
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None for qkv_format='thd'")
    if batch != 1:
        raise ValueError(f"packed sequences (qkv_format='thd') need batch size 1, got {batch}")
    return CPLayout.packed(cu, local_len, cp_size, cp_rank)


def _check_sizes(cp_size: int, cp_rank: int) -> None:
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"context_parallel_size must be a positive int, got {cp_size!r}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, {cp_size})")


def _as_list(cu) -> List[int]:
    if isinstance(cu, torch.Tensor):
        return [int(c) for c in cu.detach().cpu().reshape(-1).tolist()]
    return [int(c) for c in cu]


def zigzag_indices(cu_seqlens_global: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token indices held by `cp_rank`, in local order (the semantics of Transformer
    Engine's `thd_get_partitioned_indices`; with cu = [0, s] it is the dense per-sequence split)."""
    cu = _as_list(cu_seqlens_global)
    idx = []
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length % (2 * cp_size) != 0:
            raise ValueError(f"sequence length {length} is not divisible by 2 * cp_size = {2 * cp_size}")
        piece = length // (2 * cp_size)
        for p in (cp_rank, 2 * cp_size - 1 - cp_rank):
            idx.extend(range(start + p * piece, start + (p + 1) * piece))
    return torch.tensor(idx, dtype=torch.long)


def zigzag_shard(x: torch.Tensor, dim: int, cp_size: int, cp_rank: int,
                 cu_seqlens_global: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's part of a full-sequence tensor along `dim` (the tokens axis), as Megatron
    hands it to the layers; `cu_seqlens_global` for packed input, None for dense rows."""
    cu = [0, x.shape[dim]] if cu_seqlens_global is None else cu_seqlens_global
    return x.index_select(dim, zigzag_indices(cu, cp_size, cp_rank).to(x.device))


def zigzag_unshard(parts: Sequence[torch.Tensor], dim: int,
                   cu_seqlens_global: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of zigzag_shard: the per-rank parts (by rank) back in global token order."""
    cp_size = len(parts)
    total = sum(p.shape[dim] for p in parts)
    cu = [0, total] if cu_seqlens_global is None else cu_seqlens_global
    out = torch.empty_like(torch.cat(list(parts), dim=dim))
    for rank, part in enumerate(parts):
        out.index_copy_(dim, zigzag_indices(cu, cp_size, rank).to(part.device), part)
    return out
