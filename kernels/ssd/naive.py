"""Token-by-token scalar-decay linear attention (Mamba2's SSD recurrence): the test oracle.

Legend: B batch, T tokens, G groups of q/k (Mamba2's C/B), HV value heads, N state dim (the
q/k head dim), P value head dim, NS state rows (sequences).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t

Value head i reads group i // (HV // G). Runs in float64 for float64 inputs and in float32
otherwise; returns o in v's dtype and the final state in float32 (float64 for float64).
"""
from typing import Optional, Tuple

import torch


def naive_recurrent_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """
    Args:
        q, k: [B, T, G, N]; v: [B, T, HV, P]; g (log decay, <= 0): [B, T, HV].
        scale: defaults to 1.0 (Mamba2 does not scale C^T S).
        initial_state: [NS, HV, N, P] or None.
        cu_seqlens: [NS + 1] packed sequence boundaries (B == 1) or None (NS = B).
    Returns:
        o: [B, T, HV, P]; final_state: [NS, HV, N, P] if output_final_state else None.
    """
    B, T, G, N = q.shape
    HV, P = v.shape[2], v.shape[3]
    heads_per_group = HV // G
    if scale is None:
        scale = 1.0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, gf = (x.to(acc) for x in (q, k, v, g))
    qf = qf.repeat_interleave(heads_per_group, dim=2)
    kf = kf.repeat_interleave(heads_per_group, dim=2)

    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        c = cu_seqlens.tolist()
        spans = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]

    o = torch.zeros(B, T, HV, P, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is not None:
            S = initial_state[n].to(acc).clone()
        else:
            S = torch.zeros(HV, N, P, dtype=acc, device=q.device)
        for t in range(start, end):
            S = S * torch.exp(gf[b, t])[:, None, None] + torch.einsum("hn,hp->hnp", kf[b, t], vf[b, t])
            o[b, t] = scale * torch.einsum("hnp,hn->hp", S, qf[b, t])
        finals.append(S)
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final_state
