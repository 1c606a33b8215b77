"""The public chunked gated delta rule: argument checks, then dispatch to Triton or torch.

Legend: B batch, T tokens, H key heads, HV value heads, K key dim, V value dim, N state rows.

Both implementations receive already-validated arguments; the Triton module is imported
lazily so the torch path keeps working where Triton is broken or absent.
"""
from typing import Optional, Tuple

import torch

from ..utils import check_cu_seqlens, check_same_device, use_triton
from .torch_ref import chunk_gated_delta_rule_torch

# register-resident state tile of the Triton kernels
MAX_K_TRITON = 256
MAX_V_TRITON = 512
_QKV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")


def _check_args(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, triton: bool):
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    _check_tensor("g", g, 3)
    _check_tensor("beta", beta, 3)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, T, HV, V] with B, T = {B}, {T} as in q, got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if T == 0 or H == 0 or K == 0 or HV == 0 or V == 0:
        raise ValueError(f"empty inputs: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if HV % H != 0:
        raise ValueError(f"v has HV={HV} value heads, which is not a multiple of H={H} key heads of q/k")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(x.shape)}")

    allowed = _QKV_DTYPES if triton else _QKV_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"q has dtype {q.dtype}; expected one of {names}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: q, k, v must share one dtype")

    check_same_device(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state,
                      A_log=A_log, dt_bias=dt_bias)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        n_rows = cu_seqlens.numel() - 1
    else:
        n_rows = B

    if triton and K > MAX_K_TRITON:
        raise ValueError(f"q/k head dim K={K} exceeds the Triton kernels' limit {MAX_K_TRITON}")
    if triton and V > MAX_V_TRITON:
        raise ValueError(f"v head dim V={V} exceeds the Triton kernels' limit {MAX_V_TRITON}")

    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a python float or None, got {type(scale).__name__}")

    state_dtypes = (torch.float32,) if triton else (torch.float32, torch.float64)
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if initial_state.shape != (n_rows, HV, K, V):
            raise ValueError(
                f"initial_state must be [N, HV, K, V] = {(n_rows, HV, K, V)}, got {tuple(initial_state.shape)}"
            )
        if initial_state.dtype not in state_dtypes:
            raise TypeError(f"initial_state must be float32, got {initial_state.dtype}")

    if dt_bias is not None and A_log is None:
        raise ValueError("dt_bias is given without A_log: the fused gate needs A_log")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x is None:
            continue
        _check_tensor(name, x, 1)
        if x.shape != (HV,):
            raise ValueError(f"{name} must be [HV] = [{HV}], got {tuple(x.shape)}")
        if x.dtype not in state_dtypes:
            raise TypeError(f"{name} must be float32, got {x.dtype}")


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    use_qk_l2norm: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    use_beta_sigmoid: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule over whole sequences, chunkwise-parallel (chunk 64).

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V] with HV % H == 0 (value head i reads key head
            i // (HV // H)). One dtype: float32, bfloat16 or float16 (float64 on the torch path).
        g: [B, T, HV] log decay (<= 0), or the raw gate input `a` when A_log is given.
        beta: [B, T, HV], or logits when use_beta_sigmoid. g/beta: any float dtype (fp32 math).
        scale: defaults to K ** -0.5.
        initial_state: [N, HV, K, V] float32 or None.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: [N + 1] int32/int64 boundaries of packed sequences (B == 1), or None (N = B).
        use_qk_l2norm: q <- q rsqrt(sum_K q^2 + 1e-6), same for k.
        A_log, dt_bias: [HV] float32: g = -exp(A_log) softplus(a + dt_bias).
        use_beta_sigmoid: beta = sigmoid(beta argument).
    Returns:
        o: [B, T, HV, V] in v's dtype; final_state: [N, HV, K, V] float32, or None.
    Limits on the Triton path (CUDA tensors): K <= 256, V <= 512.
    Gradients: q, k, v, g (or a, A_log, dt_bias), beta (or its logits), initial_state.
    """
    _check_tensor("q", q, 4)
    triton = use_triton(q)
    _check_args(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, triton)
    if scale is not None:
        scale = float(scale)
    if triton:
        from .chunk import chunk_gated_delta_rule_triton as impl
    else:
        impl = chunk_gated_delta_rule_torch
    return impl(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
        use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=use_beta_sigmoid,
    )
