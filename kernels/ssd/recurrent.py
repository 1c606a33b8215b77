"""Scalar-decay recurrence for decoding (Mamba2's selective-state update): one token per
sequence per call, forward only, pure torch on any device (decoding streams the state once;
a matmul-free elementwise update is what a kernel would do too).

Legend: B sequences (state rows), G q/k groups, HV value heads, N state dim, P value head dim.

    S = exp(g) S + k v^T,   o = scale S^T q
"""
from typing import Optional, Tuple

import torch

__all__ = ["scalar_decay_step"]


def scalar_decay_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decoding step.

    Args:
        q, k: [B, G, N]; v: [B, HV, P]; g: [B, HV] log decay; state: [B, HV, N, P] float32
        (float64 allowed), updated in place and returned.
        scale: defaults to 1.0 as in chunk_scalar_decay.
    Returns:
        o: [B, HV, P] in v's dtype; the updated state.
    """
    for name, x, rank in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("g", g, 2), ("state", state, 4)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    B, G, N = q.shape
    HV, P = v.shape[1], v.shape[2]
    if k.shape != q.shape or v.shape[0] != B or HV % G != 0:
        raise ValueError(f"q, k must be [B, G, N] and v [B, HV, P] with HV % G == 0, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if g.shape != (B, HV):
        raise ValueError(f"g must be [B, HV] = {(B, HV)}, got {tuple(g.shape)}")
    if state.shape != (B, HV, N, P):
        raise ValueError(f"state must be [B, HV, N, P] = {(B, HV, N, P)}, got {tuple(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"state must be float32, got {state.dtype}")
    scale = 1.0 if scale is None else float(scale)
    acc = state.dtype
    R = HV // G
    q_h = q.to(acc).repeat_interleave(R, dim=1)
    k_h = k.to(acc).repeat_interleave(R, dim=1)
    state.mul_(torch.exp(g.to(acc))[:, :, None, None])
    state.add_(k_h.unsqueeze(-1) * v.to(acc).unsqueeze(-2))
    o = scale * torch.einsum("bhnp,bhn->bhp", state, q_h)
    return o.to(v.dtype), state
