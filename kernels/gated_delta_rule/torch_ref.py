"""Chunked gated delta rule in pure torch: the CPU path of real runs, and the chunked fp64
reference for long sequences in the GPU tests.

Legend: B batch, T tokens, H key heads, HV value heads, G = HV // H value heads per key head,
K key dim, V value dim, N state rows, NC chunks per sequence, C chunk length (64).
Internal layout is head-major and chunked: key tensors `[B, H, 1, NC, C, K]`, value-head
tensors `[B, H, G, NC, C, *]`, so GVA broadcasts over G instead of repeating q and k.

Per chunk (positions i, j), with gc the in-chunk inclusive cumsum of g:

    A_kk[i, j] = beta_i (k_i . k_j) exp(gc_i - gc_j)  (j < i),   L = I + A_kk
    w = L^{-1} (beta exp(gc) k),   u = L^{-1} (beta v)                 (the WY / UT factors)
    v_new = u - w h_c
    o     = scale ((q exp(gc)) h_c + (M_qk * q k^T) v_new),   M_qk[i, j] = exp(gc_i - gc_j) (j <= i)
    h_{c+1} = exp(gc_last) h_c + (k exp(gc_last - gc))^T v_new

Only the h recurrence is sequential (a loop over chunks); everything else is batched over
batch, heads and chunks. Gradients come from autograd. Packed sequences are laid out as a
[N, Tpad] batch, each sequence zero-padded at its end to a multiple of C: padded tokens have
g = 0 and beta = 0 (and k = 0), so they leave the state untouched and are exact.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

CHUNK = 64


def l2norm_last(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2, -1) + eps): the fused q/k normalisation of the kernel contract."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gate_from_a(a: torch.Tensor, A_log: torch.Tensor, dt_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """g = -exp(A_log) * softplus(a + dt_bias), softplus(x) = log1p(exp(x)) (x for x > 20).

    a: [B, T, HV]; A_log, dt_bias: [HV]. Computed in a's dtype (callers pass fp32/fp64)."""
    x = a if dt_bias is None else a + dt_bias.to(a.dtype)
    return -torch.exp(A_log.to(a.dtype)) * F.softplus(x, beta=1.0, threshold=20.0)


def _pack_index(cu: List[int], total: int, device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Gather index [N, Tpad] into a token axis of length total + 1 (row `total` is the zero
    pad row) and the validity mask [N, Tpad]."""
    lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    t_pad = max(1, math.ceil(max(lengths) / CHUNK)) * CHUNK
    pos = torch.arange(t_pad)
    starts = torch.tensor(cu[:-1]).unsqueeze(1)
    lens = torch.tensor(lengths).unsqueeze(1)
    valid = pos.unsqueeze(0) < lens
    index = torch.where(valid, starts + pos.unsqueeze(0), torch.full_like(starts, total))
    return index.to(device), valid.to(device), t_pad


def _to_chunks(x_btd: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """[B, Tp, heads * groups, D] -> [B, heads, groups, NC, C, D] (or without D for 3-D input)."""
    B, Tp = x_btd.shape[:2]
    nc = Tp // CHUNK
    if x_btd.dim() == 3:
        x = x_btd.reshape(B, nc, CHUNK, heads, groups)
        return x.permute(0, 3, 4, 1, 2)
    x = x_btd.reshape(B, nc, CHUNK, heads, groups, x_btd.shape[-1])
    return x.permute(0, 3, 4, 1, 2, 5)


def unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """Inverse of unit lower triangular matrices [..., C, C] (C a power of two), by doubling
    the diagonal blocks: [[A, 0], [X, B]]^-1 = [[A^-1, 0], [-B^-1 X A^-1, B^-1]].

    Batched matmuls only: on a CPU this is several times faster than a batched triangular
    solve (forward and backward), and it is forward substitution in block form, as stable."""
    batch, n = lower.shape[:-2], lower.shape[-1]
    inv = lower.new_ones(*batch, n, 1, 1)
    size = 1
    while size < n:
        pairs = n // (2 * size)
        blocks = lower.reshape(*batch, pairs, 2 * size, pairs, 2 * size).diagonal(dim1=-4, dim2=-2)
        off = blocks.movedim(-1, -3)[..., size:, :size]
        inv_a, inv_b = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        inv_x = -(inv_b @ off @ inv_a)
        top = torch.cat([inv_a, torch.zeros_like(inv_x)], dim=-1)
        inv = torch.cat([top, torch.cat([inv_x, inv_b], dim=-1)], dim=-2)
        size *= 2
    return inv.squeeze(-3)


def wy_factors(q_c, k_c, v_c, g_c, beta_c):
    """Per-chunk quantities that do not depend on the state.

    q_c, k_c: [B, H, 1, NC, C, K]; v_c: [B, H, G, NC, C, V]; g_c, beta_c: [B, H, G, NC, C].
    Returns w [.., C, K], u [.., C, V], the intra-chunk scores M_qk * q k^T [.., C, C],
    q exp(gc) [.., C, K], k exp(gc_last - gc) [.., C, K] and exp(gc_last) [B, H, G, NC].
    A context-parallel summary reuses w and k exp(gc_last - gc): per chunk the state map is
    h -> (exp(gc_last) I - (k exp(gc_last - gc))^T w) h + (k exp(gc_last - gc))^T u.
    """
    C = g_c.shape[-1]
    gc = g_c.cumsum(-1)
    # gc_last - gc_s = sum_{r > s} g_r as an exclusive reverse cumsum, not as a difference:
    # for s = last the difference would send +x and -x to the same g and, after the cumsum
    # backward, leave an fp32 rounding residue far larger than the true gradient when g << 0.
    rev = g_c.flip(-1).cumsum(-1).flip(-1)
    suffix = F.pad(rev[..., 1:], (0, 1))
    strict = torch.ones(C, C, dtype=torch.bool, device=g_c.device).tril(-1)
    eye = torch.eye(C, dtype=g_c.dtype, device=g_c.device)
    # gc_i - gc_j = sum_{j < r <= i} g_r as a masked cumsum ("segment sum"), again not as a
    # difference of cumsums: with g << 0 the telescoping +x / -x terms of the difference leave
    # rounding residues (~C eps |x|) of the size of the true gradient. exp only where j < i;
    # the diagonal is exactly 1 and stays out of autograd.
    seg = g_c.unsqueeze(-1).expand(*g_c.shape, C).masked_fill(~strict, 0.0).cumsum(-2)
    decay = seg.masked_fill(~strict, float("-inf")).exp()

    kk = k_c @ k_c.transpose(-1, -2)
    a_kk = beta_c.unsqueeze(-1) * kk * decay
    lhs = eye + a_kk
    k_b = k_c * (beta_c * gc.exp()).unsqueeze(-1)
    rhs = torch.cat([k_b, v_c * beta_c.unsqueeze(-1)], dim=-1)
    wu = unit_lower_inverse(lhs) @ rhs
    K = k_c.shape[-1]
    w, u = wu[..., :K], wu[..., K:]

    qk = (q_c @ k_c.transpose(-1, -2)) * (decay + eye)
    q_dec = q_c * gc.exp().unsqueeze(-1)
    k_dec = k_c * suffix.exp().unsqueeze(-1)
    last_decay = rev[..., 0].exp()
    return w, u, qk, q_dec, k_dec, last_decay


def chunk_scan(w, u, k_dec, last_decay, h0):
    """The sequential part: states entering each chunk and the corrected values.

    h0: [B, H, G, K, V]. Returns h_all [B, H, G, NC, K, V], v_new [B, H, G, NC, C, V], h_final.
    """
    h = h0
    hs, vs = [], []
    for c in range(w.shape[3]):
        hs.append(h)
        v_new = u[:, :, :, c] - w[:, :, :, c] @ h
        vs.append(v_new)
        h = last_decay[:, :, :, c, None, None] * h + k_dec[:, :, :, c].transpose(-1, -2) @ v_new
    return torch.stack(hs, dim=3), torch.stack(vs, dim=3), h


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    use_qk_l2norm: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    use_beta_sigmoid: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked gated delta rule (pure torch, autograd). Arguments are already validated.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV] (g holds the raw gate input
        `a` when A_log is given, beta holds logits when use_beta_sigmoid).
        initial_state: [N, HV, K, V]; cu_seqlens: [N + 1] with B == 1, or None.
    Returns:
        o: [B, T, HV, V] in v's dtype; final_state: [N, HV, K, V] float32 (float64 for float64
        inputs) if output_final_state else None.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    if scale is None:
        scale = K ** -0.5
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    q_f, k_f, v_f = q.to(acc), k.to(acc), v.to(acc)
    g_f, beta_f = g.to(acc), beta.to(acc)
    if use_qk_l2norm:
        q_f, k_f = l2norm_last(q_f), l2norm_last(k_f)
    if A_log is not None:
        g_f = gate_from_a(g_f, A_log, dt_bias)
    if use_beta_sigmoid:
        beta_f = torch.sigmoid(beta_f)

    if cu_seqlens is not None:
        cu = cu_seqlens.detach().cpu().tolist()
        index, valid, t_pad = _pack_index(cu, T, q.device)

        def pack(x):
            x = torch.cat([x[0], x.new_zeros((1,) + x.shape[2:])], dim=0)
            return x[index]

        q_f, k_f, v_f, g_f, beta_f = (pack(x) for x in (q_f, k_f, v_f, g_f, beta_f))
        n_rows = len(cu) - 1
    else:
        t_pad = math.ceil(T / CHUNK) * CHUNK
        pad = t_pad - T
        if pad:
            q_f, k_f, v_f = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q_f, k_f, v_f))
            g_f, beta_f = (F.pad(x, (0, 0, 0, pad)) for x in (g_f, beta_f))
        n_rows = B

    q_c = _to_chunks(q_f, H, 1)
    k_c = _to_chunks(k_f, H, 1)
    v_c = _to_chunks(v_f, H, G)
    g_c = _to_chunks(g_f, H, G)
    beta_c = _to_chunks(beta_f, H, G)

    w, u, qk, q_dec, k_dec, last_decay = wy_factors(q_c, k_c, v_c, g_c, beta_c)
    if initial_state is None:
        h0 = q_f.new_zeros(n_rows, H, G, K, V)
    else:
        h0 = initial_state.to(acc).reshape(n_rows, H, G, K, V)
    h_all, v_new, h_final = chunk_scan(w, u, k_dec, last_decay, h0)
    o_c = scale * (q_dec @ h_all + qk @ v_new)

    # [B', H, G, NC, C, V] -> [B', Tpad, HV, V]
    rows = o_c.shape[0]
    o = o_c.permute(0, 3, 4, 1, 2, 5).reshape(rows, t_pad, HV, V)
    if cu_seqlens is not None:
        o = o[valid].unsqueeze(0)
    else:
        o = o[:, :T]
    final_state = h_final.reshape(n_rows, HV, K, V) if output_final_state else None
    return o.to(v.dtype), final_state
