"""The public chunked scalar-decay linear attention (Mamba2 SSD): argument checks, then
dispatch to Triton (chunk.py) or torch (torch_ref.py).

Legend: B batch, T tokens, G q/k groups, HV value heads, N state dim, P value head dim, NS
state rows.
"""
from typing import Optional, Tuple

import torch

from ..utils import check_cu_seqlens, check_same_device, use_triton
from .torch_ref import chunk_scalar_decay_torch

# the Triton backward keeps whole [N, P] state tiles and [64, N] / [64, P] token tiles in
# registers
MAX_N_TRITON = 256
MAX_P_TRITON = 128
_QKV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")


def check_scalar_decay_args(q, k, v, g, scale, initial_state, cu_seqlens, triton: bool) -> int:
    """Validates the arguments of chunk_scalar_decay; returns the number of state rows NS."""
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    _check_tensor("g", g, 3)
    B, T, G, N = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, G, N] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, T, HV, P] with B, T = {B}, {T} as in q, got {tuple(v.shape)}")
    HV, P = v.shape[2], v.shape[3]
    if T == 0 or G == 0 or N == 0 or HV == 0 or P == 0:
        raise ValueError(f"empty inputs: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if HV % G != 0:
        raise ValueError(f"v has HV={HV} value heads, which is not a multiple of G={G} groups of q/k")
    if g.shape != (B, T, HV):
        raise ValueError(f"g must be [B, T, HV] = {(B, T, HV)}, got {tuple(g.shape)}")
    allowed = _QKV_DTYPES if triton else _QKV_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        raise TypeError(f"q has dtype {q.dtype}; expected one of {', '.join(str(d) for d in allowed)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: q, k, v must share one dtype")
    check_same_device(q=q, k=k, v=v, g=g, initial_state=initial_state)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        n_rows = cu_seqlens.numel() - 1
    else:
        n_rows = B
    if triton and N > MAX_N_TRITON:
        raise ValueError(f"q/k head dim N={N} exceeds the Triton kernels' limit {MAX_N_TRITON}")
    if triton and P > MAX_P_TRITON:
        raise ValueError(f"v head dim P={P} exceeds the Triton kernels' limit {MAX_P_TRITON}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a python float or None, got {type(scale).__name__}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if initial_state.shape != (n_rows, HV, N, P):
            raise ValueError(
                f"initial_state must be [NS, HV, N, P] = {(n_rows, HV, N, P)}, got {tuple(initial_state.shape)}"
            )
        state_dtypes = (torch.float32,) if triton else (torch.float32, torch.float64)
        if initial_state.dtype not in state_dtypes:
            raise TypeError(f"initial_state must be float32, got {initial_state.dtype}")
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
    Returns:
        o: [B, T, HV, P] in v's dtype; final_state: [NS, HV, N, P] float32, or None.
    Limits on the Triton path (CUDA tensors): N <= 256, P <= 128.
    Gradients: q, k, v, g, initial_state.
    """
    _check_tensor("q", q, 4)
    triton = use_triton(q)
    check_scalar_decay_args(q, k, v, g, scale, initial_state, cu_seqlens, triton)
    if scale is not None:
        scale = float(scale)
    if triton:
        from .chunk import chunk_scalar_decay_triton as impl
    else:
        impl = chunk_scalar_decay_torch
    return impl(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
