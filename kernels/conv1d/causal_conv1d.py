"""Short causal depthwise convolution (+ SiLU) over tokens, channels last.

Legend: B batch, T tokens, D channels, W kernel width (2..8), N sequences (state rows).

    y[t, d] = act(bias[d] + sum_{j=0..W-1} weight[d, j] * x[t - (W-1) + j, d])

Inputs before a sequence's first token come from `initial_state[n, d, :]`, the W-1 inputs that
precede it, oldest first (zeros when None). This history is what context parallelism (the halo
of the preceding piece) and decoding (the rolling conv state) feed in.
"""
from typing import Optional, Tuple

import torch

from ..utils import check_same_device, prepare_cu_seqlens, use_triton
from .torch_ref import torch_causal_conv1d, torch_causal_conv1d_update

MAX_WIDTH = 8
_ACTIVATIONS = (None, "silu")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_weights(weight, bias, activation, D: int) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a [D, W] tensor, got {shape}")
    if weight.shape[0] != D:
        raise ValueError(f"weight must be [D={D}, W], got {tuple(weight.shape)}")
    W = weight.shape[1]
    if not 2 <= W <= MAX_WIDTH:
        raise ValueError(f"weight width W={W} is not supported: expected 2 <= W <= {MAX_WIDTH}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if bias is not None:
        if bias.shape != (D,):
            raise ValueError(f"bias must be [D={D}], got {tuple(bias.shape)}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected 'silu' or None")
    return W


def _check_state(name: str, state: torch.Tensor, N: int, D: int, W: int) -> None:
    if state.shape != (N, D, W - 1):
        raise ValueError(f"{name} must be [N={N}, D={D}, W-1={W - 1}], got {tuple(state.shape)}")
    if state.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {state.dtype}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Short causal convolution over tokens with fused bias and activation.

    Args:
        x: [B, T, D], channels last. The channel stride must be 1 (otherwise x is copied);
            any batch and token strides are read in place (e.g. a slice of a fused projection).
        weight: [D, W] with 2 <= W <= 8; bias: [D] or None; activation: "silu" or None.
        initial_state: [N, D, W-1] or None: the W-1 inputs preceding each sequence, oldest first.
        output_final_state: also return the last W-1 inputs of each sequence.
        cu_seqlens: [N + 1] int32/int64 packed sequence boundaries with B == 1, or None (N = B).
            No input crosses a boundary; the final state of a sequence shorter than W-1 is the
            tail of its initial state followed by its tokens.
    Returns:
        y: [B, T, D] in x's dtype (computed in fp32);
        final_state: [N, D, W-1] in x's dtype if output_final_state else None.
    Gradients flow to x, weight, bias and initial_state.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a [B, T, D] tensor, got {shape}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    B, T, D = x.shape
    W = _check_weights(weight, bias, activation, D)
    check_same_device(x=x, weight=weight, bias=bias, initial_state=initial_state, cu_seqlens=cu_seqlens)
    cu_list, N = prepare_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        _check_state("initial_state", initial_state, N, D, W)

    if use_triton(x):
        from .triton_conv import triton_causal_conv1d
        return triton_causal_conv1d(x, weight, bias, activation, initial_state, output_final_state,
                                    cu_seqlens, cu_list)
    return torch_causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, cu_list)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
) -> torch.Tensor:
    """Decoding step (or short prefill) of `causal_conv1d`; forward only.

    Args:
        x: [B, D] (one token) or [B, T, D] (a short prefill).
        conv_state: [B, D, W-1], the last W-1 inputs, oldest first; updated IN PLACE to hold
            the last W-1 inputs after x.
        weight, bias, activation: as `causal_conv1d`.
    Returns:
        y: same shape and dtype as x.
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a [B, D] or [B, T, D] tensor, got {shape}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    single = x.dim() == 2
    x_btd = x[:, None] if single else x
    B, T, D = x_btd.shape
    W = _check_weights(weight, bias, activation, D)
    if not isinstance(conv_state, torch.Tensor):
        raise TypeError(f"conv_state must be a torch.Tensor, got {type(conv_state).__name__}")
    _check_state("conv_state", conv_state, B, D, W)
    check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias)

    with torch.no_grad():
        if use_triton(x):
            from .triton_conv import triton_causal_conv1d_update
            y = triton_causal_conv1d_update(x_btd, conv_state, weight, bias, activation)
        else:
            y = torch_causal_conv1d_update(x_btd, conv_state, weight, bias, activation)
    return y[:, 0] if single else y
