"""A plain single-process re-implementation of the Gated DeltaNet block, the layer's oracle.

Written from the paper's block diagram with the naive token-by-token recurrence, in float64,
from the TP=1 (global) weights:

    p = x W_in^T -> [q | k | v | z | b | a];  q, k, v <- SiLU(causal depthwise conv)
    q, k <- q / sqrt(|q|^2 + 1e-6);  g = -exp(A_log) softplus(a + dt_bias);  beta = sigmoid(b)
    o = recurrence(q, k, v, g, beta);  y = o rsqrt(mean(o^2) + eps) w silu(z) per head;  out = y W_out^T

Ablations (the layer's keywords): output_gate=False drops z (y = o rsqrt(mean(o^2) + eps) w);
short_conv=False drops the conv (q, k, v <- SiLU(projection)); decay=False drops a (g = 0).

Legend: s tokens, b batch, h hidden, H / HV key / value heads, K / V head dims, W conv taps.
"""
import torch
import torch.nn.functional as F

from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule


def _causal_conv_silu(x_btd, weight_dw, spans):
    """Depthwise causal conv, restarted at every span (b, start, end)."""
    taps = weight_dw.shape[1]
    y = torch.zeros_like(x_btd)
    for b, start, end in spans:
        seg = x_btd[b, start:end]                                   # [L, D]
        padded = torch.cat([seg.new_zeros(taps - 1, seg.shape[1]), seg])
        for t in range(end - start):
            window = padded[t:t + taps]                             # [W, D], oldest first
            y[b, start + t] = (window.T * weight_dw).sum(-1)
    return F.silu(y)


def reference_gdn_block(x_sbh, w, H, HV, K, V, eps, cu_seqlens=None, *,
                        output_gate=True, short_conv=True, decay=True):
    """x_sbh: [s, b, h]; w: dict of global float tensors in_proj, conv, A_log, dt_bias, norm,
    out_proj (conv without short_conv, A_log / dt_bias without decay left out). Returns
    [s, b, h] in float64."""
    x = x_sbh.double().transpose(0, 1)                              # [b, s, h]
    bsz, s, _ = x.shape
    p = x @ w["in_proj"].double().T
    widths = {"q": H * K, "k": H * K, "v": HV * V, "z": HV * V, "b": HV, "a": HV}
    names = [n for n in widths if (n != "z" or output_gate) and (n != "a" or decay)]
    parts = dict(zip(names, torch.split(p, [widths[n] for n in names], dim=-1)))
    q, k, v, beta_logit = parts["q"], parts["k"], parts["v"], parts["b"]
    if cu_seqlens is None:
        spans = [(i, 0, s) for i in range(bsz)]
    else:
        c = cu_seqlens.tolist()
        spans = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]
    if short_conv:
        qkv = _causal_conv_silu(torch.cat([q, k, v], -1), w["conv"].double(), spans)
    else:
        qkv = F.silu(torch.cat([q, k, v], -1))
    q, k, v = torch.split(qkv, [H * K, H * K, HV * V], dim=-1)
    q = q.reshape(bsz, s, H, K)
    k = k.reshape(bsz, s, H, K)
    v = v.reshape(bsz, s, HV, V)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if decay:
        g = -torch.exp(w["A_log"].double()) * F.softplus(parts["a"] + w["dt_bias"].double())
    else:
        g = beta_logit.new_zeros(bsz, s, HV)
    beta = torch.sigmoid(beta_logit)
    o, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, K ** -0.5, cu_seqlens=cu_seqlens)
    y = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + eps) * w["norm"].double()
    if output_gate:
        y = y * F.silu(parts["z"].reshape(bsz, s, HV, V))
    out = y.reshape(bsz, s, HV * V) @ w["out_proj"].double().T
    return out.transpose(0, 1)
