"""The public chunked scalar-decay linear attention (Mamba2 SSD): argument checks, then
dispatch to Triton (chunk.py) or torch (torch_ref.py).

Legend: B batch, T tokens, G q/k groups, HV value heads, N state dim, P value head dim, NS
state rows.
"""
from typing import Optional, Tuple

import torch

from ..utils import use_triton
from ..utils.validate import check_linear_attention_inputs, check_tensor
from .torch_ref import chunk_scalar_decay_torch

# the Triton backward keeps whole [N, P] state tiles and [64, N] / [64, P] token tiles in
# registers
MAX_N_TRITON = 256
MAX_P_TRITON = 128
def check_scalar_decay_args(q, k, v, g, scale, initial_state, cu_seqlens, triton: bool,
                            v_scale: Optional[torch.Tensor] = None,
                            d_skip: Optional[torch.Tensor] = None) -> int:
    """Validates the arguments of chunk_scalar_decay; returns the number of state rows NS."""
    per_token = {"g": g} if v_scale is None else {"g": g, "v_scale": v_scale}
    _, _, _, n_rows = check_linear_attention_inputs(
        q, k, v, per_token, scale, initial_state, cu_seqlens, triton, MAX_N_TRITON, MAX_P_TRITON,
        letters=("G", "N", "P", "NS"), extra_devices={"d_skip": d_skip},
    )
    if v_scale is not None and not v_scale.is_floating_point():
        raise TypeError(f"v_scale must be a floating tensor, got {v_scale.dtype}")
    if d_skip is not None:
        HV, P = v.shape[2], v.shape[3]
        if not isinstance(d_skip, torch.Tensor) or tuple(d_skip.shape) not in ((HV,), (HV, P)):
            shape = tuple(d_skip.shape) if isinstance(d_skip, torch.Tensor) else type(d_skip).__name__
            raise ValueError(f"d_skip must be [HV] = ({HV},) or [HV, P] = ({HV}, {P}), got {shape}")
        if not d_skip.is_floating_point():
            raise TypeError(f"d_skip must be a floating tensor, got {d_skip.dtype}")
    return n_rows


def chunk_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    d_skip: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scalar-decay linear attention over whole sequences, chunkwise-parallel (chunk 64):
    Mamba2's SSD with C as q, B as k and x * dt as v.

        S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = scale S_t^T q_t

    Args:
        q, k: [B, T, G, N] (G groups; value head i reads group i // (HV // G)).
        v: [B, T, HV, P]. q, k, v share one dtype: float32, bfloat16 or float16 (float64 on
            the torch path).
        g: [B, T, HV] log decay (<= 0; Mamba2: dt * A), any float dtype (fp32 math).
        scale: defaults to 1.0 (Mamba2 reads C^T S unscaled), unlike the gated delta rule.
        initial_state: [NS, HV, N, P] float32 or None.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: [NS + 1] int32/int64 boundaries of packed sequences (B == 1), or None (NS = B).
        v_scale: [B, T, HV] or None: v_t is read as v_t * v_scale_t (fp32 product rounded to
            v's dtype; Mamba2's x * dt), inside the kernels: the product is never stored.
        d_skip: [HV] or [HV, P] or None: o_t += d_skip * v_t (the v given, not scaled by
            v_scale; Mamba2's D x), added in fp32 before o is rounded.
    Returns:
        o: [B, T, HV, P] in v's dtype; final_state: [NS, HV, N, P] float32, or None.
    Limits on the Triton path (CUDA tensors): N <= 256, P <= 128.
    Gradients: q, k, v, g, initial_state, v_scale, d_skip.
    """
    check_tensor("q", q, 4)
    triton = use_triton(q)
    check_scalar_decay_args(q, k, v, g, scale, initial_state, cu_seqlens, triton, v_scale, d_skip)
    if scale is not None:
        scale = float(scale)
    if triton:
        from .chunk import chunk_scalar_decay_triton as impl
    else:
        impl = chunk_scalar_decay_torch
    return impl(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, v_scale, d_skip)
