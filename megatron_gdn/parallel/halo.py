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


def _gather_halos(x_td, layout: CPLayout, width: int, group):
    """(halo [n_sub, D, Kw-1] in x's dtype, its index into the gathered tails)."""
    h = width - 1
    tails = x_td.new_zeros(layout.num_segments, h, x_td.shape[1])
    for i, (start, end, m) in enumerate(_tail_spans(layout, width)):
        if m:
            tails[i, h - m:] = x_td[start:end]
    _, wait = all_gather_start(tails, group)
    index = halo_index(layout, width).to(x_td.device)
    everything = wait().reshape(-1, x_td.shape[1])
    everything = torch.cat([everything, everything.new_zeros(1, x_td.shape[1])])
    return everything[index].transpose(1, 2).contiguous(), index


def _return_halo_grads(dx, dhalo, index, layout: CPLayout, width: int, group) -> None:
    """Adds, in place, the gradients of every halo that read this rank's tails into dx (None:
    only take part in the collective)."""
    h = width - 1
    D = dhalo.shape[1]
    rows = layout.cp_size * layout.num_segments * h
    dall = dhalo.new_zeros(rows + 1, D)
    dall.index_add_(0, index.reshape(-1), dhalo.transpose(1, 2).reshape(-1, D))
    dtails = reduce_scatter(dall[:rows].reshape(-1, h, D), group)
    if dx is None:
        return
    dtails = dtails.to(dx.dtype)
    for i, (start, end, m) in enumerate(_tail_spans(layout, width)):
        if m:
            dx[start:end] += dtails[i, h - m:]


class _ConvWithHalo(torch.autograd.Function):
    """x [T, D] (the flattened local stream), weight [D, Kw], bias [D] or None -> y [T, D]: the
    conv over the local sub-segments, each starting from its halo (the Kw-1 inputs before it
    in its document, from other ranks). Backward: (dx, dweight, dbias), dx including the
    gradients of other ranks' halos that read this rank's tails. The local conv's graph is
    kept from forward to backward, so the halo gradient lands in the conv's own dx (no
    full-size gradient buffer for a few tail tokens)."""

    @staticmethod
    def forward(ctx, x_td, weight, bias, activation, layout, group):
        width = weight.shape[1]
        halo, index = _gather_halos(x_td, layout, width, group)
        with torch.enable_grad():
            inputs = [x_td, weight, bias]
            leaves = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip(inputs, ctx.needs_input_grad[:3])]
            halo = halo.requires_grad_(True)
            y, _ = causal_conv1d(leaves[0].unsqueeze(0), leaves[1], leaves[2], activation=activation,
                                 initial_state=halo,
                                 cu_seqlens=torch.tensor(layout.sub_cu, dtype=torch.int32,
                                                         device=x_td.device))
        ctx.graph = (y, leaves, halo)
        ctx.save_for_backward(index)
        ctx.layout, ctx.group, ctx.width = layout, group, width
        return y.detach()[0]

    @staticmethod
    def backward(ctx, dy):
        (index,) = ctx.saved_tensors
        y, leaves, halo = ctx.graph
        ctx.graph = None
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wanted + [halo], dy.unsqueeze(0))
        dhalo = grads[-1]
        it = iter(grads[:-1])
        out = [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
        # every rank takes part in the reduce-scatter, also one whose x needs no gradient
        _return_halo_grads(out[0], dhalo, index, ctx.layout, ctx.width, ctx.group)
        # activation, layout, group: not tensors
        return (*out, None, None, None)


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
    y = _ConvWithHalo.apply(x_btd.reshape(B * T, D), weight, bias, activation, layout, group)
    return y.reshape(B, T, D)
