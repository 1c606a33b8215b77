"""Gated RMSNorm: the output norm of Gated DeltaNet, RMSNorm(o) * SiLU(z) per head.

Legend: R rows (all leading dims flattened), D normalised dim (the value head dim).

    y = x * rsqrt(mean(x^2) + eps) * weight * silu(z)
"""
import torch

from ..utils import check_same_device, use_triton
from .torch_ref import torch_gated_rmsnorm

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gated RMS normalisation over the last dim.

    Args:
        x: [..., D]; z: same shape as x (the gate); weight: [D]; eps > 0 (python float).
    Returns:
        y: [..., D] in x's dtype; statistics and products are computed in fp32.
    Gradients flow to x, z and weight.
    """
    for name, t in (("x", x), ("z", z), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D > 0, got {tuple(x.shape)}")
    if z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D={D}], got {tuple(weight.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    check_same_device(x=x, z=z, weight=weight)

    if use_triton(x):
        from .triton_norm import triton_gated_rmsnorm
        return triton_gated_rmsnorm(x, z, weight, float(eps))
    return torch_gated_rmsnorm(x, z, weight, float(eps))
