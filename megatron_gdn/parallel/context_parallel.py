"""The chunked gated delta rule under context parallelism, by passing states between pieces.

Legend: R cp_size, r this rank, N zigzag units, 2N local pieces (pieces r and 2R-1-r of each
unit), sub-segments (the local pieces cut at document starts; one kernel row each), see
zigzag.CPLayout; p a global piece index 0..2R-1, HV value heads of this rank, K / V key / value
head dims, T local tokens, Phi_t the transition from a segment's entering state to the state
after its token t (Phi_t = A_t ... A_1, A_t = exp(g_t)(I - beta_t k_t k_t^T), symmetric).

A segment maps the state entering it affinely: S_t = Phi_t S_in + S0_t (S0_t: the state reached
from zero), so its outputs are

    o_t = scale S_t^T q_t = o0_t + S_in^T oq_t,    oq_t = scale Phi_t^T q_t     ([K] per head)

and its final state is S_out = M S_in + H with M = Phi_T, H = S0_T. The recurrence acts on
every value column on its own, so ONE call of the local chunk kernel with v widened to
[v | 0_K] and the initial state [0 | I_K] returns all four: outputs [o0 | oq] and final state
[H | M] (`segment_maps`; two calls where the widened state would not fit the Triton kernel).

Forward, per layer: that call over the sub-segments (autograd on); a piece's map is that of
its last sub-segment, with M = 0 where a document starts inside the piece or at its start
(the chain is cut there); one all-gather of the pieces' [H | M] over the CP group
([R * 2N, HV, K, V + K] fp32, independent of the length); a fold per unit in global piece
order (S <- M_p S + H_p, S = 0 at the unit start) giving S_in of the local pieces, passed on
to the first sub-segment of each piece unless a document starts there; and
o = o0 + S_in^T oq (a small per-sub-segment matmul).
Backward: autograd through the same graph. The gradient reaching S_in is D = sum_t oq_t do_t^T
(from the matmul, no kernel pass); one all-gather of [D | M] ([R * 2N, HV, K, V + K] fp32); a
reverse fold gives the gradient arriving at the end of each local segment, G_p = D_{p+1} + M_{p+1}^T
G_{p+1} (G = 0 after the last piece); the summaries receive dH = G, dM = G S_in^T; and ONE
backward call of the widened kernel turns (d[o0 | oq], d[H | M]) into every input gradient.

Cost against the plain kernel on the local tokens: the kernel runs once forward and once
backward, on V + K instead of V value columns; no recomputation, no second pass.
Overlap: the forward all-gather is started before the fp32 up-cast of o0 and the index
set-up, which do not need the incoming states. In backward nothing local is independent of
G (the kernel's backward needs it), and the exchange is a few MiB; for large R a log-depth
scan would replace the O(R) fold, which here is 2R small batched matmuls.

The head count plays no part: every rank keeps all of its (TP-local) heads, so any
context-parallel size works with any head count.
"""
from typing import List, Optional

import torch

from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule
from megatron_gdn.kernels.gated_delta_rule.api import MAX_V_TRITON
from megatron_gdn.kernels.utils import use_triton

from .collectives import all_gather_start
from .zigzag import CPLayout, piece_owner

__all__ = ["chunk_gated_delta_rule_cp", "segment_maps", "fold_states", "fold_state_grads"]


def segment_maps(q, k, v, g, beta, scale, cu_seqlens, **fused):
    """Outputs and affine summaries of packed segments, differentiable.

    Inputs as chunk_gated_delta_rule with B == 1 and cu_seqlens of N non-empty segments.
    Returns o0 [1, T, HV, V] (outputs from a zero entering state), oq [1, T, HV, K]
    (scale Phi_t^T q_t), h [N, HV, K, V] and m [N, HV, K, K] (fp32): S_out = m S_in + h.
    """
    N = cu_seqlens.numel() - 1
    HV, V = v.shape[2], v.shape[3]
    K = k.shape[3]
    eye = torch.eye(K, dtype=torch.float32, device=v.device).expand(N, HV, K, K)
    zeros_k = v.new_zeros(*v.shape[:3], K)
    if use_triton(q) and V + K > MAX_V_TRITON:
        # the widened state would not fit the kernel's state tile: two calls
        o0, h = chunk_gated_delta_rule(q, k, v, g, beta, scale, None, True, cu_seqlens, **fused)
        oq, m = chunk_gated_delta_rule(q, k, zeros_k, g, beta, scale, eye.contiguous(), True,
                                       cu_seqlens, **fused)
        return o0, oq, h, m
    h0 = torch.cat([eye.new_zeros(N, HV, K, V), eye], dim=-1)
    o, hm = chunk_gated_delta_rule(q, k, torch.cat([v, zeros_k], dim=-1), g, beta, scale, h0,
                                   True, cu_seqlens, **fused)
    return o[..., :V], o[..., V:], hm[..., :V], hm[..., V:]


def _pieces_view(gathered: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """[R * 2N, ...] all-gathered per-piece tensor -> [R, N, 2, ...]."""
    return gathered.view(layout.cp_size, layout.num_seqs, 2, *gathered.shape[1:])


def fold_states(h_all: torch.Tensor, m_all: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """S_in of this rank's 2N pieces, [2N, HV, K, V], from the gathered H [R * 2N, HV, K, V]
    and M [R * 2N, HV, K, K]: S <- M_p S + H_p over pieces p = 0, 1, ... of every unit at
    once (batched over units and heads)."""
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
    """The gradient arriving at the end of each of this rank's 2N pieces, [2N, HV, K, V],
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


class _PassStates(torch.autograd.Function):
    """h [2N, HV, K, V], m [2N, HV, K, K] fp32 (this rank's pieces) -> s_in [2N, HV, K, V],
    the state entering each local piece; backward: d s_in [2N, HV, K, V] -> (dh, dm) of the
    local pieces. One all-gather over the CP group each way: [h | m] forward (started by the
    caller, so that independent work overlaps it), [d s_in | m] backward (m travels again
    rather than every rank keeping all R * 2N transitions: saved memory stays local, which
    matters for packs of many documents)."""

    @staticmethod
    def forward(ctx, h, m, layout, group, wait):
        """wait: returns the all-gathered [h | m] (the caller started the all-gather)."""
        V = h.shape[-1]
        gathered = wait()
        s_in = fold_states(gathered[..., :V], gathered[..., V:], layout)
        ctx.save_for_backward(m, s_in)
        ctx.layout, ctx.group = layout, group
        return s_in

    @staticmethod
    def backward(ctx, ds_in):
        m, s_in = ctx.saved_tensors
        V = s_in.shape[-1]
        _, wait = all_gather_start(torch.cat([ds_in.float(), m], dim=-1), ctx.group)
        gathered = wait()
        g_end = fold_state_grads(gathered[..., :V], gathered[..., V:], ctx.layout)
        # S_out = m S_in + h: dh = G, dm = G S_in^T
        # layout, group, wait: not tensors
        return g_end, torch.matmul(g_end, s_in.transpose(-1, -2)), None, None, None


def _segments(x: torch.Tensor, cu: List[int]):
    """Per-segment views of x [1, T, ...]: one [n, P, ...] view when all segments have the
    same length P, else a list of [P_i, ...] slices."""
    lens = {b - a for a, b in zip(cu[:-1], cu[1:])}
    if len(lens) == 1:
        return x.reshape(len(cu) - 1, lens.pop(), *x.shape[2:])
    return [x[0, a:b] for a, b in zip(cu[:-1], cu[1:])]


class _ApplyStates(torch.autograd.Function):
    """oq [1, T, HV, K] (v's dtype), s_in [n, HV, K, V] fp32 for the n segments of cu ->
    S_in^T oq per token, [1, T, HV, V] fp32. Saves oq in its own dtype (half of an fp32 copy
    under bf16) and computes in fp32 both ways. Backward: d oq = S_in do (oq's dtype),
    d s_in = sum_t oq_t do_t^T (fp32). The products in bf16 on tensor cores instead (run 8,
    H200, GDN 1.3B dims, CP=4 at 128K) gained nothing (93.98 against 92.28 ms per step) and
    loosened the CP=4 parity (worst gradient 8.2e-3 against 6.5e-3): fp32 stays."""

    @staticmethod
    def forward(ctx, oq, s_in, cu):
        seg = _segments(oq, cu)
        if isinstance(seg, torch.Tensor):
            out = torch.einsum("nthk,nhkv->nthv", seg.float(), s_in)
        else:
            out = torch.cat([torch.einsum("thk,hkv->thv", x.float(), s_in[i]) for i, x in enumerate(seg)])
        ctx.save_for_backward(oq, s_in)
        ctx.cu = cu
        return out.reshape(1, -1, *out.shape[-2:])

    @staticmethod
    def backward(ctx, dout):
        oq, s_in = ctx.saved_tensors
        seg, dseg = _segments(oq, ctx.cu), _segments(dout.float(), ctx.cu)
        if isinstance(seg, torch.Tensor):
            doq = torch.einsum("nthv,nhkv->nthk", dseg, s_in)
            ds_in = torch.einsum("nthk,nthv->nhkv", seg.float(), dseg)
        else:
            doq = torch.cat([torch.einsum("thv,hkv->thk", d, s_in[i]) for i, d in enumerate(dseg)])
            ds_in = torch.stack([torch.einsum("thk,thv->hkv", x.float(), d) for x, d in zip(seg, dseg)])
        # cu: not a tensor
        return doq.reshape(oq.shape).to(oq.dtype), ds_in, None


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
            (all ranks call this together, with the same layout.unit_lens).
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
    fused = dict(use_qk_l2norm=use_qk_l2norm, use_beta_sigmoid=use_beta_sigmoid,
                 A_log=A_log, dt_bias=dt_bias)
    device = q.device
    subs = layout.sub_segments
    sub_cu = layout.sub_cu
    o0, oq, h_sub, m_sub = segment_maps(
        *flat, float(scale), torch.tensor(sub_cu, dtype=torch.int32, device=device), **fused
    )
    HV, K, V = h_sub.shape[1], h_sub.shape[2], h_sub.shape[3]
    # a piece's map is its last sub-segment's; a document start inside the piece (or at its
    # start) cuts the chain: m = 0. Empty pieces map a state to itself: h = 0, m = I
    last = {}
    for i, sub in enumerate(subs):
        last[sub.local_piece] = i
    pieces = torch.tensor(sorted(last), dtype=torch.long, device=device)
    rows = torch.tensor([last[p] for p in sorted(last)], dtype=torch.long, device=device)
    cont = torch.tensor([float(sub.continues) for sub in subs], dtype=torch.float32, device=device)
    cont = cont[:, None, None, None]
    h = h_sub.new_zeros(layout.num_segments, HV, K, V).index_copy(0, pieces, h_sub[rows])
    m = torch.eye(K, dtype=m_sub.dtype, device=device).repeat(layout.num_segments, HV, 1, 1)
    m = m.index_copy(0, pieces, (m_sub * cont)[rows])
    _, wait = all_gather_start(torch.cat([h, m], dim=-1).detach(), group)
    # while the summaries travel: what does not need the incoming states
    owner = torch.tensor([sub.local_piece for sub in subs], dtype=torch.long, device=device)
    o0 = o0.float()
    s_in = _PassStates.apply(h, m, layout, group, wait)
    # the entering state of each sub-segment: its piece's, or zero where a document starts
    s_in_sub = s_in.index_select(0, owner) * cont
    o = o0 + _ApplyStates.apply(oq, s_in_sub, sub_cu)
    return o.to(v.dtype).reshape(B, T, *o.shape[2:])
