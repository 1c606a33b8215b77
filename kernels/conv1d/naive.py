"""Token-by-token short causal convolution: the test oracle (never used for real runs).

Legend: B batch, T tokens, D channels, W kernel width, N sequences (state rows).

    y[t, d] = act(bias[d] + sum_{j=0..W-1} weight[d, j] * x[t - (W-1) + j, d])

Inputs before a sequence's first token come from initial_state[n, d, :] (the W-1 preceding
inputs, oldest first; zeros when None). Runs in float64 for float64 inputs and in float32
otherwise; returns y and the final state in x's dtype.
"""
from typing import Optional, Tuple

import torch


def naive_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """
    Args:
        x: [B, T, D]; weight: [D, W]; bias: [D] or None; activation: "silu" or None.
        initial_state: [N, D, W-1] or None.
        cu_seqlens: [N + 1] packed sequence boundaries (B == 1) or None.
    Returns:
        y: [B, T, D]; final_state: [N, D, W-1] if output_final_state else None.
    """
    B, T, D = x.shape
    W = weight.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w_wd = weight.to(acc).t()
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        c = cu_seqlens.tolist()
        spans = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]

    rows = [[] for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is not None:
            history_wd = initial_state[n].to(acc).t()
        else:
            history_wd = torch.zeros(W - 1, D, dtype=acc, device=x.device)
        buf_ld = torch.cat([history_wd, x[b, start:end].to(acc)], dim=0)
        for t in range(end - start):
            out_d = (buf_ld[t:t + W] * w_wd).sum(0)
            if bias is not None:
                out_d = out_d + bias.to(acc)
            if activation == "silu":
                out_d = out_d * torch.sigmoid(out_d)
            rows[b].append(out_d)
        finals.append(buf_ld[buf_ld.shape[0] - (W - 1):].t())
    y = torch.stack([torch.stack(r) if r else x.new_zeros(0, D, dtype=acc) for r in rows])
    final_state = torch.stack(finals).to(x.dtype) if output_final_state else None
    return y.to(x.dtype), final_state
