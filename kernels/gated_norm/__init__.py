"""Gated RMSNorm, y = RMSNorm(x) * weight * SiLU(z) (GDN's output norm), and the gate-first,
grouped variant y = RMSNorm(x * SiLU(z)) * weight (Mamba2's): Triton kernels on CUDA, a torch
path on CPU, a naive oracle for tests."""
from .norm import gate_then_rmsnorm, gated_rmsnorm
from .naive import naive_gated_rmsnorm
from .torch_ref import torch_gate_then_rmsnorm, torch_gated_rmsnorm

__all__ = ["gate_then_rmsnorm", "gated_rmsnorm", "naive_gated_rmsnorm", "torch_gate_then_rmsnorm",
           "torch_gated_rmsnorm"]
