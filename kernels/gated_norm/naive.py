"""Gated RMSNorm, written out plainly: the test oracle.

    y = x * rsqrt(mean(x^2) + eps) * weight * silu(z)      (statistics over the last dim D)

Runs in float64 for float64 inputs and in float32 otherwise; returns y in x's dtype.
"""
import torch


def naive_gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x, z: [..., D]; weight: [D] -> y: [..., D]."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, zf, wf = x.to(acc), z.to(acc), weight.to(acc)
    rstd = 1.0 / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    y = xf * rstd * wf * (zf * torch.sigmoid(zf))
    return y.to(x.dtype)
