"""Gated RMSNorm, y = RMSNorm(x) * weight * SiLU(z): Triton kernels on CUDA, a torch path on
CPU, a naive oracle for tests."""
from .norm import gated_rmsnorm
from .naive import naive_gated_rmsnorm
from .torch_ref import torch_gated_rmsnorm

__all__ = ["gated_rmsnorm", "naive_gated_rmsnorm", "torch_gated_rmsnorm"]
