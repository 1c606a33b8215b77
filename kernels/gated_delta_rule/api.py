"""The public chunked gated delta rule: argument checks, then dispatch to Triton or torch.

Legend: B batch, T tokens, H key heads, HV value heads, K key dim, V value dim, N state rows.

Both implementations receive already-validated arguments; the Triton module is imported
lazily so the torch path keeps working where Triton is broken or absent.
"""
from typing import Optional, Tuple

import torch

from ..utils import keep_states_default, use_triton
from ..utils.validate import check_linear_attention_inputs, check_tensor, state_dtypes
from .torch_ref import chunk_gated_delta_rule_torch

# K: the state tile of the Triton kernels holds all K rows in registers. V: every kernel walks
# the value columns in blocks, so V is bounded only by this check; the contract is V <= 512
# (checked on the GPU at S4, K = 256 / V = 512), and context parallelism widens v by K
# (V + K = 768 at the 1.3B dims) in one call.
MAX_K_TRITON = 256
MAX_V_TRITON = 1024


def _check_args(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, triton: bool):
    _, _, HV, _ = check_linear_attention_inputs(
        q, k, v, {"g": g, "beta": beta}, scale, initial_state, cu_seqlens, triton,
        MAX_K_TRITON, MAX_V_TRITON, extra_devices={"A_log": A_log, "dt_bias": dt_bias},
    )
    if dt_bias is not None and A_log is None:
        raise ValueError("dt_bias is given without A_log: the fused gate needs A_log")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x is None:
            continue
        check_tensor(name, x, 1)
        if x.shape != (HV,):
            raise ValueError(f"{name} must be [HV] = [{HV}], got {tuple(x.shape)}")
        if x.dtype not in state_dtypes(triton):
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
    keep_states: Optional[bool] = None,
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
        keep_states: Triton path: keep the state entering every chunk and the chunks' v_new
            from the forward for the backward, which then skips its sequential state pass
            (memory: ceil(T / 64) K V + T V elements per sequence and value head in v's dtype,
            0.5 GB per call at 4 x 4096 tokens, 6 heads, K 256, V 512). None: the
            `MEGATRON_GDN_KEEP_STATES` environment variable ('0' by default: recompute).
            The torch path ignores it.
    Returns:
        o: [B, T, HV, V] in v's dtype; final_state: [N, HV, K, V] float32, or None.
    Limits on the Triton path (CUDA tensors): K <= 256, V <= 1024; head dims below 64 run
    zero-padded to 64 (exact; see chunk.padded_head_dims).
    Gradients: q, k, v, g (or a, A_log, dt_bias), beta (or its logits), initial_state.
    """
    check_tensor("q", q, 4)
    triton = use_triton(q)
    _check_args(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, triton)
    if scale is not None:
        scale = float(scale)
    fused = dict(use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias,
                 use_beta_sigmoid=use_beta_sigmoid)
    if not triton:
        return chunk_gated_delta_rule_torch(
            q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, **fused)
    from .chunk import chunk_gated_delta_rule_triton

    if keep_states is None:
        keep_states = keep_states_default()
    return chunk_gated_delta_rule_triton(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
        keep_states=bool(keep_states), **fused)
