"""Token-by-token gated delta rule: the test oracle (never used for real runs).

Legend: B batch, T tokens, H key heads, HV value heads, K key dim, V value dim, N state rows.

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t

Value head i reads key head i // (HV // H). Runs in float64 for float64 inputs and in float32
otherwise; returns o in the input dtype and the final state in float32 (float64 for float64).
"""
from typing import Optional, Tuple

import torch


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """
    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V]; g (log decay, <= 0), beta: [B, T, HV].
        scale: defaults to K ** -0.5.
        initial_state: [N, HV, K, V] or None.
        cu_seqlens: [N + 1] packed sequence boundaries (B == 1) or None.
    Returns:
        o: [B, T, HV, V]; final_state: [N, HV, K, V] if output_final_state else None.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    group = HV // H
    if scale is None:
        scale = K ** -0.5
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, gf, bf = (x.to(acc) for x in (q, k, v, g, beta))
    qf = qf.repeat_interleave(group, dim=2)
    kf = kf.repeat_interleave(group, dim=2)

    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        c = cu_seqlens.tolist()
        spans = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]

    o = torch.zeros(B, T, HV, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is not None:
            S = initial_state[n].to(acc).clone()
        else:
            S = torch.zeros(HV, K, V, dtype=acc, device=q.device)
        for t in range(start, end):
            k_t = kf[b, t]  # [HV, K]
            S = S * torch.exp(gf[b, t])[:, None, None]
            u = bf[b, t][:, None] * (vf[b, t] - torch.einsum("hkv,hk->hv", S, k_t))
            S = S + torch.einsum("hk,hv->hkv", k_t, u)
            o[b, t] = scale * torch.einsum("hkv,hk->hv", S, qf[b, t])
        finals.append(S)
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final_state
