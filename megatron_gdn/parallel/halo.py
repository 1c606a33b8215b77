"""The short conv under context parallelism: each local piece's halo, forward and backward.

Legend: B batch rows, T_local local tokens per row, D channels, Kw conv taps (halo Kw-1),
N zigzag units, 2N local pieces, n_sub local sub-segments (see zigzag.CPLayout), R = cp_size.

A causal conv over a piece needs the Kw-1 conv INPUTS that precede it in its document: the
tail of the globally preceding piece, which another rank holds (zeros at a document start;
a document starting inside a piece starts a new conv row with a zero history).
A piece may be shorter than Kw-1 tokens; then the halo reaches back over several pieces. So
every rank contributes the last min(P_n, Kw-1) tokens of each of its 2N segments (right
aligned in a [Kw-1] slot), one all-gather makes every tail visible everywhere, and each halo
is a fixed gather from that buffer (index computed from the layout, identical on all ranks),
cut at the document start.
The backward is the adjoint: scatter-add the halo gradients into a buffer of all tails,
reduce-scatter it so each rank receives the gradient of its own tails, add those into dx.
Traffic per layer and direction: R * 2N * (Kw-1) * D elements, independent of the length.
"""
from typing import List

import torch

from megatron_gdn.kernels.conv1d import causal_conv1d

from .collectives import all_gather_start, reduce_scatter
from .zigzag import CPLayout, piece_owner

__all__ = ["conv_with_cp_halo", "halo_index"]


def halo_index(layout: CPLayout, width: int) -> torch.Tensor:
    """[n_sub, Kw-1] rows of the gathered tail buffer [R * 2N * (Kw-1) (+1 zero row)] that form
    each local sub-segment's halo, oldest first; the last row index (the zero row) where a
    halo reaches before its document's start (every sub-segment that starts a document)."""
    h = width - 1
    zero_row = layout.cp_size * layout.num_segments * h
    rows: List[List[int]] = []
    for sub in layout.sub_segments:
        plen = layout.piece_lens[sub.unit]
        row = []
        for i in range(h):
            pos = sub.pos - h + i
            if pos < sub.doc_start:
                row.append(zero_row)
                continue
            # only a sub-segment that starts its piece reaches back: pos lies in earlier pieces
            j, o = divmod(pos, plen)
            owner, slot = piece_owner(j, layout.cp_size)
            row.append(layout.segment_index(owner, sub.unit, slot) * h + h - (plen - o))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), h)


def _tail_spans(layout: CPLayout, width: int):
    """(start, end, m) per local segment: its last m = min(P, Kw-1) tokens are [start, end)."""
    cu = layout.local_cu
    h = width - 1
    spans = []
    for i in range(layout.num_segments):
        m = min(cu[i + 1] - cu[i], h)
        spans.append((cu[i + 1] - m, cu[i + 1], m))
    return spans


class _ConvHalo(torch.autograd.Function):
    """x [T, D] (the flattened local stream) -> halo [n_sub, D, Kw-1] (the conv's initial_state
    per local sub-segment, oldest first); backward: d halo [n_sub, D, Kw-1] -> dx [T, D]
    (nonzero only on the piece tails that halos read)."""

    @staticmethod
    def forward(ctx, x_td, layout, group, width):
        h = width - 1
        spans = _tail_spans(layout, width)
        tails = x_td.new_zeros(layout.num_segments, h, x_td.shape[1])
        for i, (start, end, m) in enumerate(spans):
            if m:
                tails[i, h - m:] = x_td[start:end]
        _, wait = all_gather_start(tails, group)
        index = halo_index(layout, width).to(x_td.device)
        everything = wait().reshape(-1, x_td.shape[1])
        everything = torch.cat([everything, everything.new_zeros(1, x_td.shape[1])])
        halo = everything[index].transpose(1, 2).contiguous()
        ctx.save_for_backward(index)
        ctx.layout, ctx.group, ctx.width, ctx.tokens = layout, group, width, x_td.shape[0]
        return halo

    @staticmethod
    def backward(ctx, dhalo):
        (index,) = ctx.saved_tensors
        layout, h = ctx.layout, ctx.width - 1
        D = dhalo.shape[1]
        rows = layout.cp_size * layout.num_segments * h
        dall = dhalo.new_zeros(rows + 1, D)
        dall.index_add_(0, index.reshape(-1), dhalo.transpose(1, 2).reshape(-1, D))
        dtails = reduce_scatter(dall[:rows].reshape(-1, h, D), ctx.group)
        dx = dhalo.new_zeros(ctx.tokens, D)
        for i, (start, end, m) in enumerate(_tail_spans(layout, ctx.width)):
            if m:
                dx[start:end] = dtails[i, h - m:]
        # layout, group, width: not tensors
        return dx, None, None, None


def conv_with_cp_halo(x_btd: torch.Tensor, weight: torch.Tensor, bias, activation, layout: CPLayout,
                      group) -> torch.Tensor:
    """causal_conv1d over this rank's zigzag pieces with the halo of the preceding pieces.

    Args:
        x_btd: [B, T_local, D] conv input in the zigzag layout of `layout` (dense rows or one
            packed row); any strides.
        weight [D, Kw], bias [D] or None, activation: as causal_conv1d.
        layout: CPLayout of this rank; group: the context-parallel process group.
    Returns:
        y_btd [B, T_local, D], as the conv over the full sequences would give on these tokens.
    """
    B, T, D = x_btd.shape
    if B * T != layout.local_tokens:
        raise ValueError(f"x has {B} x {T} tokens but the CP layout describes {layout.local_tokens}")
    width = weight.shape[1]
    x_td = x_btd.reshape(B * T, D)
    halo = _ConvHalo.apply(x_td, layout, group, width)
    y, _ = causal_conv1d(x_td.unsqueeze(0), weight, bias, activation=activation,
                         initial_state=halo.to(x_td.dtype),
                         cu_seqlens=torch.tensor(layout.sub_cu, dtype=torch.int32,
                                                 device=x_td.device))
    return y.reshape(B, T, D)
