"""Megatron's load-balanced ("zigzag") context-parallel layout, as index arithmetic.

Legend: W context-parallel size, r this rank, N zigzag units, P_n piece length of unit n,
L_n (padded) length of unit n, T_local tokens on one rank.

Megatron cuts every zigzag UNIT into 2W equal pieces and gives rank r the pieces r and
2W-1-r. What a unit is depends on the input:

- dense input ([s, b, h], no packed_seq_params; `get_batch_on_this_cp_rank`, per-sequence
  balancing): each of the b rows is one unit of length s * W; rank r holds, per row,
  piece r followed by piece 2W-1-r.
- packed THD input, per document (batch 1, `PackedSeqParams`; Megatron's default when the
  batch has cu_seqlens, through Transformer Engine's `thd_get_partitioned_indices`): every
  document n of padded length L_n (a multiple of 2W) is a unit; rank r holds, for each
  document in order, its piece r then its piece 2W-1-r: [doc0 piece r | doc0 piece 2W-1-r |
  doc1 piece r | ...]. Document boundaries coincide with unit boundaries.
- packed THD input, whole pack (`get_batch_on_this_cp_rank(use_per_sequence_balancing=True)`,
  which Megatron-LM's pretrain_gpt.py uses with --dataloader-inter-document-masking): the
  whole pack is one unit split like a dense row, and the documents start anywhere, also
  inside pieces.
In both packed cases the layer receives the GLOBAL `cu_seqlens_q(_padded)` (Megatron leaves
the metadata unsharded), ending at W * T_local.

`CPLayout` turns any of these into the same description: the local stream flattened to one
packed row of 2N local pieces, their split into "sub-segments" at document starts (each
sub-segment is one call row of the local kernels), and the map from each global piece to the
rank and slot holding it. All python integers: every rank knows the whole layout without
communication.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from megatron_gdn.config import thd_cu_seqlens

__all__ = ["CPLayout", "SubSegment", "layout_for_layer", "zigzag_indices", "zigzag_shard",
           "zigzag_unshard", "PACKED_LAYOUTS"]

PACKED_LAYOUTS = ("auto", "per_document", "whole_pack")


def piece_owner(piece: int, cp_size: int) -> Tuple[int, int]:
    """(rank, local slot 0/1) holding piece `piece` of a unit cut into 2 * cp_size pieces."""
    if piece < cp_size:
        return piece, 0
    return 2 * cp_size - 1 - piece, 1


class SubSegment(NamedTuple):
    """A run of local tokens inside one piece and one document.

    start, end: local token range; local_piece: 0..2N-1 (2n + slot); unit, piece: the unit n
    and global piece p; pos: the position of `start` inside its unit; doc_start: where its
    document starts inside the unit; continues: it starts at its piece's start and its
    document started before, so it takes the state (and conv inputs) entering the piece."""

    start: int
    end: int
    local_piece: int
    unit: int
    piece: int
    pos: int
    doc_start: int
    continues: bool


@dataclass(frozen=True)
class CPLayout:
    """The zigzag layout of one rank's local tokens.

    Attributes:
        cp_size, cp_rank: W and r.
        unit_lens: (padded) length L_n of every zigzag unit, identical on all ranks.
        batch: rows of the local input (dense: b; packed: 1).
        doc_starts: per unit, the positions inside it where documents start (0 included);
            () means one document per unit.
    """

    cp_size: int
    cp_rank: int
    unit_lens: Tuple[int, ...]
    batch: int
    doc_starts: Tuple[Tuple[int, ...], ...] = ()

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
    def packed(cls, cu_seqlens_global, local_tokens: int, cp_size: int, cp_rank: int,
               layout: str = "auto") -> "CPLayout":
        """Packed THD input (batch 1) described by the GLOBAL (padded) cu_seqlens.

        layout: "per_document" (each document its own zigzag unit, Megatron's default),
        "whole_pack" (the pack zigzagged as one unit, documents anywhere), or "auto":
        per_document when every document length is a multiple of 2W, else whole_pack (the only
        layout such a batch can have)."""
        _check_sizes(cp_size, cp_rank)
        if layout not in PACKED_LAYOUTS:
            raise ValueError(f"packed layout {layout!r}: expected one of {PACKED_LAYOUTS}")
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
        bad = [n for n, length in enumerate(lens) if length % (2 * cp_size) != 0]
        if layout == "auto":
            layout = "whole_pack" if bad else "per_document"
        if layout == "per_document":
            if bad:
                raise ValueError(
                    f"packed sequence {bad[0]} has (padded) length {lens[bad[0]]}, not divisible "
                    f"by 2 * context_parallel_size = {2 * cp_size}; pad every sequence to a "
                    "multiple of it (cu_seqlens_q_padded) or zigzag the whole pack"
                )
            return cls(cp_size, cp_rank, lens, 1)
        if cu[-1] % (2 * cp_size) != 0:
            raise ValueError(
                f"the pack has {cu[-1]} tokens, not divisible by 2 * context_parallel_size = "
                f"{2 * cp_size}"
            )
        starts = tuple(sorted({c for c in cu[:-1] if c < cu[-1]} | {0}))
        return cls(cp_size, cp_rank, (cu[-1],), 1, (starts,))

    # -------------------------------------------------------------------- derived
    @property
    def num_seqs(self) -> int:
        """Zigzag units N."""
        return len(self.unit_lens)

    @property
    def num_segments(self) -> int:
        """Local pieces: two per unit (pieces r and 2W-1-r), empty ones included."""
        return 2 * self.num_seqs

    @property
    def piece_lens(self) -> Tuple[int, ...]:
        return tuple(length // (2 * self.cp_size) for length in self.unit_lens)

    @property
    def local_tokens(self) -> int:
        return 2 * sum(self.piece_lens)

    @property
    def local_cu(self) -> List[int]:
        """Boundaries of the 2N local pieces in the flattened local stream."""
        cu = [0]
        for p in self.piece_lens:
            cu += [cu[-1] + p, cu[-1] + 2 * p]
        return cu

    def local_pieces(self, rank: Optional[int] = None) -> Tuple[int, int]:
        r = self.cp_rank if rank is None else rank
        return r, 2 * self.cp_size - 1 - r

    def segment_index(self, rank: int, seq: int, slot: int) -> int:
        """Row of (rank, unit, slot) in an all-gathered [W * 2N, ...] per-piece tensor."""
        return (rank * self.num_seqs + seq) * 2 + slot

    def unit_doc_starts(self, unit: int) -> Tuple[int, ...]:
        return self.doc_starts[unit] if self.doc_starts else (0,)

    @cached_property
    def sub_segments(self) -> Tuple[SubSegment, ...]:
        """The non-empty local runs, in local order, cut at piece ends and document starts."""
        out = []
        local_cu = self.local_cu
        for n, plen in enumerate(self.piece_lens):
            starts = self.unit_doc_starts(n)
            for slot, piece in enumerate(self.local_pieces()):
                lo, hi = piece * plen, (piece + 1) * plen
                cuts = [lo] + [d for d in starts if lo < d < hi] + [hi]
                base = local_cu[2 * n + slot] - lo
                for a, b in zip(cuts[:-1], cuts[1:]):
                    if b == a:
                        continue
                    doc = max(d for d in starts if d <= a)
                    out.append(SubSegment(a + base, b + base, 2 * n + slot, n, piece, a, doc,
                                          a == lo and doc < a))
        return tuple(out)

    @property
    def sub_cu(self) -> List[int]:
        """Boundaries of the sub-segments (they tile the local stream)."""
        subs = self.sub_segments
        return [subs[0].start if subs else 0] + [s.end for s in subs]


def layout_for_layer(packed_seq_params, batch: int, local_len: int, cp_group,
                     packed_layout: str = "auto") -> CPLayout:
    """The CPLayout of a layer input [local_len, batch, h] on this rank of `cp_group`: packed THD
    when packed_seq_params has qkv_format 'thd' (batch 1; cu_seqlens_q_padded, else
    cu_seqlens_q, global as Megatron passes them; `packed_layout` as CPLayout.packed), dense
    rows otherwise."""
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    cu = thd_cu_seqlens(packed_seq_params, batch)
    if cu is None:
        return CPLayout.dense(batch, local_len, cp_size, cp_rank)
    return CPLayout.packed(cu, local_len, cp_size, cp_rank, packed_layout)


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
    hands it to the layers; `cu_seqlens_global` for packed input split per document, None for
    dense rows and for packs zigzagged as a whole."""
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
