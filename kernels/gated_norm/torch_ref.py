"""Gated RMSNorm in plain torch: the CPU path (autograd gives the gradients).

    y = x * rsqrt(mean(x^2) + eps) * weight * silu(z)
"""
import torch


def torch_gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Arguments as `gated_rmsnorm` (already validated)."""
    # fp32 statistics for low-precision inputs; fp64 stays fp64 for the oracle comparison
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = xf * rstd * weight.to(acc) * torch.nn.functional.silu(z.to(acc))
    return y.to(x.dtype)


def torch_gate_then_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int = 1,
                            eps: float = 1e-6) -> torch.Tensor:
    """Arguments as `gate_then_rmsnorm` (already validated): rmsnorm(x * silu(z)) * weight over
    `groups` equal slices of the last dim."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = x.to(acc) * torch.nn.functional.silu(z.to(acc))
    u = u.unflatten(-1, (groups, u.shape[-1] // groups))
    u = u * torch.rsqrt(u.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (u.flatten(-2) * weight.to(acc)).to(x.dtype)
