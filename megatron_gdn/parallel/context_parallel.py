"""The chunked gated delta rule under context parallelism, by passing states between pieces.

Legend: R cp_size, r this rank, N sequences, 2N local segments (pieces r and 2R-1-r of each
sequence, see zigzag.CPLayout), p a global piece index 0..2R-1, HV value heads of this rank,
K / V key / value head dims, B / T local batch rows / tokens per row.

A piece maps the state entering it affinely, S_out = M S_in + H (M = prod_t exp(g_t)(I -
beta_t k_t k_t^T), [K, K]; H the state reached from zero, [K, V]). The recurrence acts on each
value column on its own, so ONE call of the local chunk kernel gives both: with v widened to
[v | 0_K] and the initial state [0 | I_K], the final state is [H | M] (`segment_summaries`).

Forward, per layer:
  1. [H | M] of the 2N local segments, fp32, without autograd;
  2. one all-gather over the CP group ([R * 2N, HV, K, V + K] fp32: independent of length);
  3. every rank folds, per sequence and in global piece order, S <- M_p S + H_p (S = 0 at the
     sequence start: packed sequences reset at every boundary) to get S_in of its segments;
  4. the local kernel with initial_state = S_in and output_final_state (kept for backward).
Backward, the mirror (the transitions are already known from step 2):
  1. D = dS_in of every local segment for its output gradient only (no gradient at its end);
  2. one all-gather of D ([R * 2N, HV, K, V] fp32);
  3. reverse fold: the gradient arriving at the end of piece p is G_p = D_{p+1} + M_{p+1}^T
     G_{p+1}, G_{2R-1} = 0;
  4. the local backward with (do, d final_state = G).
Step 1 of each direction is behind one function (`segment_summaries`, `_segment_state_grads`)
so a summary-only kernel can replace the generic calls of the full kernel.

The head count plays no part: every rank keeps all of its (TP-local) heads, so any
context-parallel size works with any head count.
"""
from typing import List, Optional, Tuple

import torch

from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule
from megatron_gdn.kernels.gated_delta_rule.api import MAX_V_TRITON
from megatron_gdn.kernels.utils import use_triton

from .collectives import all_gather_start
from .zigzag import CPLayout, piece_owner

__all__ = ["chunk_gated_delta_rule_cp", "segment_summaries", "fold_states", "fold_state_grads"]


def segment_summaries(q, k, v, g, beta, scale, cu_seqlens, **fused) -> torch.Tensor:
    """The affine map of every packed segment: [N, HV, K, V + K] fp32, [..., :V] = H (final
    state from a zero state), [..., V:] = M (transition). Inputs as chunk_gated_delta_rule with
    B == 1 and cu_seqlens of N non-empty segments; fused options as there. No autograd."""
    N = cu_seqlens.numel() - 1
    HV, V = v.shape[2], v.shape[3]
    K = k.shape[3]
    with torch.no_grad():
        eye = torch.eye(K, dtype=torch.float32, device=v.device).expand(N, HV, K, K)
        if use_triton(q) and V + K > MAX_V_TRITON:
            # the widened state would not fit the kernel's state tile: two calls
            _, h = chunk_gated_delta_rule(q, k, v, g, beta, scale, None, True, cu_seqlens, **fused)
            _, m = chunk_gated_delta_rule(q, k, v.new_zeros(*v.shape[:3], K), g, beta, scale,
                                          eye.contiguous(), True, cu_seqlens, **fused)
            return torch.cat([h, m], dim=-1)
        v_ext = torch.cat([v, v.new_zeros(*v.shape[:3], K)], dim=-1)
        h0 = torch.cat([eye.new_zeros(N, HV, K, V), eye], dim=-1)
        _, hm = chunk_gated_delta_rule(q, k, v_ext, g, beta, scale, h0, True, cu_seqlens, **fused)
    return hm


def _pieces_view(gathered: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """[R * 2N, ...] all-gathered per-segment tensor -> [R, N, 2, ...]."""
    return gathered.view(layout.cp_size, layout.num_seqs, 2, *gathered.shape[1:])


def fold_states(h_all: torch.Tensor, m_all: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """S_in of this rank's 2N segments, [2N, HV, K, V], from the gathered H [R * 2N, HV, K, V]
    and M [R * 2N, HV, K, K]: S <- M_p S + H_p over pieces p = 0, 1, ... of every sequence at
    once (batched over sequences and heads)."""
    R = layout.cp_size
    h, m = _pieces_view(h_all, layout), _pieces_view(m_all, layout)
    first, second = layout.local_pieces()
    state = torch.zeros_like(h[0, :, 0])
    out = [None, None]
    for p in range(second + 1):
        if p == first:
            out[0] = state
        if p == second:
            out[1] = state
            break
        owner, slot = piece_owner(p, R)
        state = torch.matmul(m[owner, :, slot], state) + h[owner, :, slot]
    return torch.stack(out, dim=1).reshape(layout.num_segments, *h.shape[3:])


def fold_state_grads(d_all: torch.Tensor, m_all: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """The gradient arriving at the end of each of this rank's 2N segments, [2N, HV, K, V],
    from the gathered D = dS_in [R * 2N, HV, K, V] and M: G_{2R-1} = 0,
    G_{p-1} = D_p + M_p^T G_p."""
    R = layout.cp_size
    d, m = _pieces_view(d_all, layout), _pieces_view(m_all, layout)
    first, second = layout.local_pieces()
    grad = torch.zeros_like(d[0, :, 0])
    out = [None, None]
    for p in range(2 * R - 1, first - 1, -1):
        if p == second:
            out[1] = grad
        if p == first:
            out[0] = grad
            break
        owner, slot = piece_owner(p, R)
        grad = torch.matmul(m[owner, :, slot].transpose(-1, -2), grad) + d[owner, :, slot]
    return torch.stack(out, dim=1).reshape(layout.num_segments, *d.shape[3:])


def _segment_state_grads(o, s_in, do) -> torch.Tensor:
    """D = dS_in of each segment for the output gradient alone (zero gradient at its end)."""
    (d,) = torch.autograd.grad(o, s_in, do, retain_graph=True)
    return d


def _nonempty(cu: List[int]) -> Tuple[List[int], List[int]]:
    """(indices of non-empty segments, boundaries of those segments only)."""
    keep = [i for i in range(len(cu) - 1) if cu[i + 1] > cu[i]]
    return keep, [cu[0]] + [cu[i + 1] for i in keep]


class _StatePassingChunk(torch.autograd.Function):
    """Packed local stream in, local outputs out (all B == 1, tokens in zigzag segment order):
    q, k [1, T, H, K]; v [1, T, HV, V]; g, beta [1, T, HV]; A_log, dt_bias [HV] or None
    -> o [1, T, HV, V]. Gradients for every tensor input. The local graph of step 4 is kept
    from forward to backward (no recomputation)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, scale, layout, group, fused):
        K, V, HV = k.shape[3], v.shape[3], v.shape[2]
        keep, cu_keep = _nonempty(layout.local_cu)
        cu_t = torch.tensor(cu_keep, dtype=torch.int32, device=q.device)
        keep_t = torch.tensor(keep, dtype=torch.long, device=q.device)
        kernel_fused = dict(fused, A_log=A_log, dt_bias=dt_bias)

        summaries = torch.zeros(layout.num_segments, HV, K, V + K, dtype=torch.float32, device=q.device)
        summaries[..., V:] = torch.eye(K, dtype=torch.float32, device=q.device)
        if keep:
            summaries[keep_t] = segment_summaries(q, k, v, g, beta, scale, cu_t, **kernel_fused)
        _, wait = all_gather_start(summaries, group)

        # independent of the incoming states: the leaves of the local graph
        inputs = [q, k, v, g, beta, A_log, dt_bias]
        leaves = [None if x is None else x.detach().requires_grad_(need)
                  for x, need in zip(inputs, ctx.needs_input_grad)]

        gathered = wait()
        m_all = gathered[..., V:].contiguous()
        s_in = fold_states(gathered[..., :V], m_all, layout)

        with torch.enable_grad():
            s_in_leaf = s_in[keep_t].requires_grad_(True)
            lq, lk, lv, lg, lb, la, ld = leaves
            o_keep, s_out = chunk_gated_delta_rule(
                lq, lk, lv, lg, lb, scale, s_in_leaf, True, cu_t, **dict(fused, A_log=la, dt_bias=ld)
            )
        ctx.graph = (o_keep, s_out, s_in_leaf, leaves)
        ctx.save_for_backward(m_all, keep_t)
        ctx.layout, ctx.group = layout, group
        return o_keep.detach()

    @staticmethod
    def backward(ctx, do):
        m_all, keep_t = ctx.saved_tensors
        o, s_out, s_in_leaf, leaves = ctx.graph
        layout = ctx.layout
        d_keep = _segment_state_grads(o, s_in_leaf, do)
        d = d_keep.new_zeros(layout.num_segments, *d_keep.shape[1:])
        d[keep_t] = d_keep
        _, wait = all_gather_start(d, ctx.group)
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        g_end = fold_state_grads(wait(), m_all, layout)[keep_t]
        grads = torch.autograd.grad((o, s_out), wanted, (do, g_end)) if wanted else ()
        ctx.graph = None
        it = iter(grads)
        out = [next(it) if (x is not None and x.requires_grad) else None for x in leaves]
        # scale, layout, group, fused: not tensors
        return (*out, None, None, None, None)


def chunk_gated_delta_rule_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    layout: CPLayout,
    group,
    scale: Optional[float] = None,
    *,
    use_qk_l2norm: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    use_beta_sigmoid: bool = False,
) -> torch.Tensor:
    """chunk_gated_delta_rule over sequences spread over the context-parallel group.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]: this rank's tokens in
            Megatron's zigzag layout described by `layout` (B rows of dense sequences, or one
            packed row); meanings and fused options as chunk_gated_delta_rule.
        layout: zigzag.CPLayout of this rank; group: the context-parallel process group
            (all ranks call this together with the same layout.seq_lens).
    Returns:
        o: [B, T, HV, V], equal to the output of the full sequences at these tokens. No
        initial / final state: sequences start from zero state (training).
    """
    B, T = q.shape[:2]
    if B * T != layout.local_tokens:
        raise ValueError(f"q has {B} x {T} tokens but the CP layout describes {layout.local_tokens}")
    if scale is None:
        scale = k.shape[-1] ** -0.5
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    fused = dict(use_qk_l2norm=use_qk_l2norm, use_beta_sigmoid=use_beta_sigmoid)
    o = _StatePassingChunk.apply(*flat, A_log, dt_bias, float(scale), layout, group, fused)
    return o.reshape(B, T, *o.shape[2:])
