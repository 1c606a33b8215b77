"""Chunked scalar-decay linear attention (Mamba2 SSD) in pure torch: the CPU path of real runs
and the chunked reference for long sequences in the GPU tests. Gradients come from autograd.

Legend: B batch, T tokens, G q/k groups, HV value heads (R = HV // G per group), N state dim,
P value head dim, NS state rows, NC chunks per row, C chunk length (64).

Per chunk (positions i, j), with gc the in-chunk inclusive cumsum of g:

    o_i     = scale (exp(gc_i) q_i^T h_c + sum_{j <= i} exp(gc_i - gc_j) (q_i . k_j) v_j)
    h_{c+1} = exp(gc_last) h_c + sum_j exp(gc_last - gc_j) k_j v_j^T

Only the h recurrence is sequential. Exponent differences are formed as masked ("segment")
sums of g, not as differences of cumsums: with g << 0 the difference of two large cumsums
leaves rounding residues of the size of the true gradient. Packed sequences are laid out as
an [NS, Tpad] batch, zero-padded at the end to a multiple of C (padded tokens have g = 0 and
k = v = 0, so they leave the state untouched).
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

CHUNK = 64


def pack_index(cu: List[int], total: int, device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Gather index [NS, Tpad] into a token axis of length total + 1 (row `total` is a zero
    pad row) and the validity mask [NS, Tpad]."""
    lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    t_pad = max(1, math.ceil(max(lengths) / CHUNK)) * CHUNK
    pos = torch.arange(t_pad)
    starts = torch.tensor(cu[:-1]).unsqueeze(1)
    lens = torch.tensor(lengths).unsqueeze(1)
    valid = pos.unsqueeze(0) < lens
    index = torch.where(valid, starts + pos.unsqueeze(0), torch.full_like(starts, total))
    return index.to(device), valid.to(device), t_pad


def _chunks(x: torch.Tensor) -> torch.Tensor:
    """[B, Tp, H, *] -> [B, H, NC, C, *] (3-D [B, Tp, H] -> [B, H, NC, C])."""
    B, Tp, H = x.shape[:3]
    x = x.reshape(B, Tp // CHUNK, CHUNK, H, *x.shape[3:])
    return x.movedim(3, 1)


def chunk_scalar_decay_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    d_skip: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked scalar-decay linear attention (pure torch, autograd); arguments already validated.

    Args:
        q, k: [B, T, G, N]; v: [B, T, HV, P]; g: [B, T, HV]; initial_state: [NS, HV, N, P];
        cu_seqlens: [NS + 1] with B == 1, or None; v_scale: [B, T, HV] or None (v read as
        v * v_scale, the product in fp32 (fp64 for float64 inputs) rounded to v's dtype);
        d_skip: [HV] or [HV, P] or None (o += d_skip * v, the v given).
    Returns:
        o: [B, T, HV, P] in v's dtype; final_state: [NS, HV, N, P] float32 (float64 for
        float64 inputs) if output_final_state else None.
    """
    B, T, G, N = q.shape
    HV, P = v.shape[2], v.shape[3]
    R = HV // G
    v_given = v
    if v_scale is not None:
        wide = torch.promote_types(v.dtype, torch.float32)
        v = (v.to(wide) * v_scale.to(wide).unsqueeze(-1)).to(v.dtype)
    if scale is None:
        scale = 1.0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_f, k_f, v_f, g_f = (x.to(acc) for x in (q, k, v, g))

    if cu_seqlens is not None:
        cu = cu_seqlens.detach().cpu().tolist()
        index, valid, t_pad = pack_index(cu, T, q.device)

        def pack(x):
            x = torch.cat([x[0], x.new_zeros((1,) + x.shape[2:])], dim=0)
            return x[index]

        q_f, k_f, v_f, g_f = (pack(x) for x in (q_f, k_f, v_f, g_f))
        rows = len(cu) - 1
    else:
        t_pad = math.ceil(T / CHUNK) * CHUNK
        pad = t_pad - T
        if pad:
            q_f, k_f, v_f = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q_f, k_f, v_f))
            g_f = F.pad(g_f, (0, 0, 0, pad))
        rows = B

    # value heads as [G, R]: q/k broadcast over R instead of being repeated
    q_c = _chunks(q_f).unsqueeze(2)                      # [NS, G, 1, NC, C, N]
    k_c = _chunks(k_f).unsqueeze(2)                      # [NS, G, 1, NC, C, N]
    v_c = _chunks(v_f).unflatten(1, (G, R))              # [NS, G, R, NC, C, P]
    g_c = _chunks(g_f).unflatten(1, (G, R))              # [NS, G, R, NC, C]

    C = CHUNK
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    eye = torch.eye(C, dtype=acc, device=q.device)
    gc = g_c.cumsum(-1)
    # seg[i, j] = sum_{j < r <= i} g_r (j < i), exp only below the diagonal; diagonal is 1
    seg = g_c.unsqueeze(-1).expand(*g_c.shape, C).masked_fill(~strict, 0.0).cumsum(-2)
    decay = seg.masked_fill(~strict, float("-inf")).exp() + eye
    # suffix[j] = sum_{r > j} g_r (exclusive reverse cumsum), total = sum_r g_r
    rev = g_c.flip(-1).cumsum(-1).flip(-1)
    suffix = F.pad(rev[..., 1:], (0, 1))
    last_decay = rev[..., 0].exp()                       # [NS, G, R, NC]

    scores = (q_c @ k_c.transpose(-1, -2)) * decay       # [NS, G, R, NC, C, C]
    o_intra = scores @ v_c
    k_dec = k_c * suffix.exp().unsqueeze(-1)             # [NS, G, R, NC, C, N]
    chunk_states = k_dec.transpose(-1, -2) @ v_c         # [NS, G, R, NC, N, P]

    if initial_state is None:
        h = q_f.new_zeros(rows, G, R, N, P)
    else:
        h = initial_state.to(acc).reshape(rows, G, R, N, P)
    hs = []
    for c in range(g_c.shape[3]):
        hs.append(h)
        h = last_decay[:, :, :, c, None, None] * h + chunk_states[:, :, :, c]
    h_all = torch.stack(hs, dim=3)                       # [NS, G, R, NC, N, P]
    o_c = scale * ((q_c * gc.exp().unsqueeze(-1)) @ h_all + o_intra)

    o = o_c.flatten(1, 2).movedim(1, 3).reshape(rows, t_pad, HV, P)
    if cu_seqlens is not None:
        o = o[valid].unsqueeze(0)
    else:
        o = o[:, :T]
    final_state = h.reshape(rows, HV, N, P) if output_final_state else None
    if d_skip is not None:
        o = o + d_skip.to(acc).reshape(HV, -1) * v_given.to(acc)
    return o.to(v.dtype), final_state
