"""Short causal depthwise convolution (+ SiLU) with history state, for Gated DeltaNet's
q/k/v convolutions: Triton kernels on CUDA, a torch path on CPU, a naive oracle for tests."""
from .conv import causal_conv1d, causal_conv1d_update
from .naive import naive_causal_conv1d
from .torch_ref import torch_causal_conv1d, torch_causal_conv1d_update

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "naive_causal_conv1d",
    "torch_causal_conv1d",
    "torch_causal_conv1d_update",
]
