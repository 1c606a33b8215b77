"""A straightforward float64 Mamba2 block (the math of megatron-core's MambaMixer with
mamba_ssm's kernels spelled out: conv1d over [x, B, C] + SiLU, softplus dt, token-by-token
selective scan with groups, D skip, RMSNorm over groups of y * SiLU(z)), for the tests.

Inputs: hidden [s, b, h] and the GLOBAL (TP=1) parameters under MambaMixer's names;
cu_seqlens (b == 1) resets the conv and the scan at every packed sequence start. dt_bias and
A_log may also be given per token ([s, b, nheads]): their gradients are then the per-token
terms whose sums are the parameters' gradients (a test's measure of how much those sums cancel).
"""
import torch
import torch.nn.functional as F


def reference_mamba2_block(hidden, params, *, headdim, d_state, ngroups, eps=1e-5, cu_seqlens=None):
    p = {k: v.double() for k, v in params.items()}
    s, b, _ = hidden.shape
    nheads = p["A_log"].shape[-1]
    d_inner = nheads * headdim
    gs = ngroups * d_state
    zxbcdt = hidden.double() @ p["in_proj.weight"].t()                      # [s, b, ...]
    z, xbc, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * gs, nheads], dim=-1)
    bounds = [0, s] if cu_seqlens is None else [int(c) for c in cu_seqlens]
    W = p["conv1d_weight"].shape[-1]
    y_all = torch.zeros(s, b, d_inner, dtype=torch.float64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        seg = xbc[lo:hi].permute(1, 2, 0)                                   # [b, D, t]
        conv = F.conv1d(F.pad(seg, (W - 1, 0)), p["conv1d_weight"], p["conv1d_bias"],
                        groups=seg.shape[1])
        xbc_c = F.silu(conv).permute(2, 0, 1)                               # [t, b, D]
        x, B, C = torch.split(xbc_c, [d_inner, gs, gs], dim=-1)
        dt_bias = p["dt_bias"][lo:hi] if p["dt_bias"].dim() == 3 else p["dt_bias"]
        dt_s = F.softplus(dt[lo:hi] + dt_bias)                              # [t, b, nh]
        A = -torch.exp(p["A_log"][lo:hi] if p["A_log"].dim() == 3 else p["A_log"].expand(hi - lo, b, nheads))
        state = torch.zeros(b, nheads, headdim, d_state, dtype=torch.float64)
        for t in range(hi - lo):
            xt = x[t].view(b, nheads, headdim)
            Bt = B[t].view(b, ngroups, d_state).repeat_interleave(nheads // ngroups, dim=1)
            Ct = C[t].view(b, ngroups, d_state).repeat_interleave(nheads // ngroups, dim=1)
            dA = torch.exp(dt_s[t] * A[t])                                  # [b, nh]
            state = state * dA[..., None, None] + (dt_s[t][..., None] * xt)[..., None] * Bt[:, :, None, :]
            yt = (state * Ct[:, :, None, :]).sum(-1)                        # [b, nh, P]
            D = p["D"].view(nheads, -1)
            yt = yt + D * xt
            y_all[lo + t] = yt.reshape(b, d_inner)
    u = y_all * F.silu(z)
    u = u.view(s, b, ngroups, d_inner // ngroups)
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
    u = u.view(s, b, d_inner) * p["norm.weight"]
    return u @ p["out_proj.weight"].t()
