"""Recurrent gated delta rule for decoding: one token or a short prefill per call, forward only.

Legend: B batch, T tokens, H key heads, HV value heads (HV % H == 0, value head i reads key
head i // (HV // H)), K key dim, V value dim, N state rows (B, or the number of packed
sequences when cu_seqlens is given with B == 1).

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t

Decoding is bound by streaming the [N, HV, K, V] fp32 state once in and once out; the tokens
themselves are a few hundred bytes per head. So the Triton kernel gives every program one
(sequence, value head, V-block) tile of the state, K x BV in registers, loaded once with
row-contiguous (V-major) loads and written once at the end, and does everything else inside
the same launch: gate (A_log / dt_bias softplus), beta sigmoid, q/k L2 norm, the delta update
and the output, token after token. Splitting V into blocks gives thousands of programs at
decode batch sizes, enough loads in flight to reach the copy bandwidth.

Reads top to bottom: Triton kernel, launcher, pure-torch path (CPU), argument checks, the
public dispatching function.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..utils import check_same_device, prepare_cu_seqlens, use_triton

__all__ = ["fused_recurrent_gated_delta_rule"]

_QKV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton path: the K x BV state tile lives in registers; larger K would spill
_MAX_K_TRITON = 256
# softplus(x) = x above this (exp(20) ~ 5e8: log1p(exp(x)) - x < 3e-9)
_SOFTPLUS_THRESHOLD = 20.0
# the chunk kernel's epsilon (DESIGN: x * rsqrt(sum_K x^2 + 1e-6))
_L2NORM_EPS = 1e-6


@triton.jit
def _fused_recurrent_gdr_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    o,
    h0,
    ht,
    cu_seqlens,
    A_log,
    dt_bias,
    scale,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    EVEN_KV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    USE_GATE_PARAMS: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    USE_BETA_SIGMOID: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        seq_len = eos - bos
    else:
        bos = i_n * T
        seq_len = T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    # the state tile first: it is the only large load, get it in flight before anything else
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :]
        if EVEN_KV:
            # no mask: nothing stands in the way of 16-byte vector loads along V
            b_h += tl.load(p_h0).to(tl.float32)
        else:
            b_h += tl.load(p_h0, mask=m_h, other=0.0).to(tl.float32)

    if USE_GATE_PARAMS:
        b_neg_a = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_DT_BIAS:
            b_dt = tl.load(dt_bias + i_hv).to(tl.float32)

    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * HV + i_hv) * V + o_v
    p_o = o + (bos * HV + i_hv) * V + o_v
    p_g = g + bos * HV + i_hv
    p_beta = beta + bos * HV + i_hv

    for _ in range(0, seq_len):
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(p_g).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)

        # literals below: _L2NORM_EPS and _SOFTPLUS_THRESHOLD of the torch path
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        if USE_GATE_PARAMS:
            b_x = b_g
            if HAS_DT_BIAS:
                b_x = b_x + b_dt
            # softplus; log(1 + exp(x)) loses nothing that matters for x << 0 (g -> 0 there)
            b_sp = tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
            b_g = b_neg_a * b_sp
        if USE_BETA_SIGMOID:
            b_beta = 1.0 / (1.0 + tl.exp(-b_beta))

        b_h *= tl.exp(b_g)
        # delta rule: the value the state predicts for k, corrected towards v
        b_v = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)

        p_q += H * K
        p_k += H * K
        p_v += HV * V
        p_o += HV * V
        p_g += HV
        p_beta += HV

    if STORE_FINAL_STATE:
        p_ht = ht + i_nh * K * V + o_k[:, None] * V + o_v[None, :]
        if EVEN_KV:
            tl.store(p_ht, b_h)
        else:
            tl.store(p_ht, b_h, mask=m_h)


def _default_config(n_rows: int, K: int, V: int) -> Tuple[int, int]:
    """(BV, num_warps): ~64 fp32 state values per thread, and V split finely enough that a
    decode batch gives at least ~1024 programs (several per SM) to keep loads in flight.

    Chosen from a BV x num_warps sweep on an H200 (benchmarks/RESULTS.md, decode section):
    BV = 32 was best or within noise of the best for both K = V = 128 and K = 256, V = 512 at
    B = 64, with 2 (K = 128) or 2-4 (K = 256) warps; 8 warps and BV = 8 were 10-30% slower."""
    BK = triton.next_power_of_2(K)
    BV = min(32, triton.next_power_of_2(V))
    while BV > 8 and n_rows * triton.cdiv(V, BV) < 1024:
        BV //= 2
    num_warps = max(1, min(8, BK * BV // 2048))
    return BV, num_warps


def _fused_recurrent_triton(
    q, k, v, g, beta, scale, initial_state, final_state, cu_seqlens, N,
    use_qk_l2norm, A_log, dt_bias, use_beta_sigmoid, block_v=None, num_warps=None,
):
    """Launcher: allocates o and sets the grid. final_state may alias initial_state (each
    program reads its tile before writing the same tile, and tiles are disjoint)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK = triton.next_power_of_2(K)
    BV, warps = _default_config(N * HV, K, V)
    BV = block_v or BV
    warps = num_warps or warps
    o = torch.empty_like(v)
    grid = (triton.cdiv(V, BV), N * HV)
    _fused_recurrent_gdr_fwd_kernel[grid](
        q, k, v, g, beta, o, initial_state, final_state, cu_seqlens, A_log, dt_bias,
        scale, T,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV,
        EVEN_KV=(BK == K and V % BV == 0),
        IS_VARLEN=cu_seqlens is not None,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None,
        USE_QK_L2NORM=use_qk_l2norm,
        USE_GATE_PARAMS=A_log is not None,
        HAS_DT_BIAS=dt_bias is not None,
        USE_BETA_SIGMOID=use_beta_sigmoid,
        num_warps=warps,
        num_stages=1,
    )
    return o


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + _L2NORM_EPS)


def _fused_recurrent_torch(
    q, k, v, g, beta, scale, initial_state, cu_seqlens_list, N,
    use_qk_l2norm, A_log, dt_bias, use_beta_sigmoid,
):
    """Pure torch, fp32: a loop over tokens, vectorised over sequences and heads.

    Packed input (B == 1) is regrouped so that step s updates token s of every sequence that
    is at least s + 1 long. Returns (o in v's dtype, final state [N, HV, K, V] fp32)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    f32 = torch.float32
    qf, kf, vf, gf, bf = (x.to(f32) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        qf, kf = _l2norm(qf), _l2norm(kf)
    if A_log is not None:
        x = gf + dt_bias.to(f32) if dt_bias is not None else gf
        sp = torch.where(x > _SOFTPLUS_THRESHOLD, x, torch.log1p(torch.exp(x.clamp(max=_SOFTPLUS_THRESHOLD))))
        gf = -torch.exp(A_log.to(f32)) * sp
    if use_beta_sigmoid:
        bf = torch.sigmoid(bf)
    qf = qf.repeat_interleave(G, dim=2)
    kf = kf.repeat_interleave(G, dim=2)

    if cu_seqlens_list is None:
        starts = torch.zeros(N, dtype=torch.long)
        lens = torch.full((N,), T, dtype=torch.long)
        rows = torch.arange(N)
    else:
        c = torch.tensor(cu_seqlens_list, dtype=torch.long)
        starts, lens = c[:-1], c[1:] - c[:-1]
        rows = torch.zeros(N, dtype=torch.long)
    dev = q.device
    starts, lens, rows = starts.to(dev), lens.to(dev), rows.to(dev)

    if initial_state is not None:
        S = initial_state.to(f32).clone()
    else:
        S = q.new_zeros(N, HV, K, V, dtype=f32)
    o = torch.zeros(B, T, HV, V, dtype=f32, device=dev)
    max_len = int(lens.max().item()) if N > 0 else 0
    for s in range(max_len):
        live = lens > s
        pos = torch.where(live, starts + s, torch.zeros_like(starts))
        q_t, k_t, v_t = qf[rows, pos], kf[rows, pos], vf[rows, pos]  # [N, HV, *]
        decay = torch.exp(gf[rows, pos])  # [N, HV]
        b_t = bf[rows, pos]
        S_new = S * decay[..., None, None]
        u = b_t[..., None] * (v_t - torch.einsum("nhkv,nhk->nhv", S_new, k_t))
        S_new = S_new + k_t[..., :, None] * u[..., None, :]
        o_t = scale * torch.einsum("nhkv,nhk->nhv", S_new, q_t)
        S = torch.where(live[:, None, None, None], S_new, S)
        o[rows[live], pos[live]] = o_t[live]
    return o.to(v.dtype), S


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_packed_while_capturing(cu_seqlens, batch):
    """cu_seqlens checks that need no host copy: inside a CUDA graph capture (decode loops) a
    device-to-host read of the boundaries would break the capture, so their values go
    unchecked there."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens (packed sequences) needs batch size 1, got B={batch}")
    return None, cu_seqlens.numel() - 1


def _check_args(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, inplace_state, triton_path):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B={B}, T={T}, HV, V], got shape {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"value heads HV={HV} must be a multiple of key heads H={H} (GVA)")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if q.dtype not in _QKV_DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a python float or None, got {type(scale).__name__}")
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state,
                      A_log=A_log, dt_bias=dt_bias)
    if cu_seqlens is not None and triton_path and _capturing(q):
        cu_list, N = _check_packed_while_capturing(cu_seqlens, B)
    else:
        cu_list, N = prepare_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        if tuple(initial_state.shape) != (N, HV, K, V):
            raise ValueError(
                f"initial_state must be [N, HV, K, V] = {(N, HV, K, V)}, got {tuple(initial_state.shape)}"
            )
        if initial_state.dtype != torch.float32:
            raise TypeError(f"initial_state must be float32, got {initial_state.dtype}")
    if inplace_state:
        if initial_state is None:
            raise ValueError("inplace_state=True needs an initial_state to write into, got None")
        if not initial_state.is_contiguous():
            raise ValueError("inplace_state=True needs a contiguous initial_state")
    if dt_bias is not None and A_log is None:
        raise ValueError("dt_bias is only used with A_log; got dt_bias without A_log")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x is None:
            continue
        if tuple(x.shape) != (HV,):
            raise ValueError(f"{name} must be [HV] = [{HV}], got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {x.dtype}")
    return cu_list, N


def fused_recurrent_gated_delta_rule(
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
    inplace_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule, token by token (decoding, short prefills); forward only.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V], same dtype (fp32, bf16, fp16), HV % H == 0.
        g: [B, T, HV] log decay (<= 0), or the raw gate input a when A_log is given.
        beta: [B, T, HV], or logits when use_beta_sigmoid.
        scale: defaults to K ** -0.5.
        initial_state: [N, HV, K, V] float32 or None.
        output_final_state: return the state after the last token of each sequence.
        cu_seqlens: [N + 1] packed sequence boundaries (B == 1) or None.
        use_qk_l2norm: q, k <- x * rsqrt(sum_K x^2 + 1e-6) per token and head.
        A_log, dt_bias: [HV] float32; decay g = -exp(A_log) * softplus(g + dt_bias).
        use_beta_sigmoid: beta <- sigmoid(beta).
        inplace_state: write the new state into initial_state (needed, fp32, contiguous) and
            return that tensor as the final state (implies output_final_state).
    Returns:
        o: [B, T, HV, V] in v's dtype; final_state: [N, HV, K, V] float32 or None.
    """
    triton_path = use_triton(q)
    cu_list, N = _check_args(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, inplace_state,
                             triton_path)
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)

    if not triton_path:
        o, state = _fused_recurrent_torch(
            q, k, v, g, beta, scale, initial_state, cu_list, N,
            use_qk_l2norm, A_log, dt_bias, use_beta_sigmoid,
        )
        if inplace_state:
            initial_state.copy_(state)
            return o, initial_state
        return o, (state if output_final_state else None)

    if K > _MAX_K_TRITON:
        raise ValueError(f"the Triton path supports K <= {_MAX_K_TRITON}, got K={K}")
    if inplace_state:
        final_state = initial_state
    elif output_final_state:
        final_state = q.new_empty(N, v.shape[2], K, v.shape[3], dtype=torch.float32)
    else:
        final_state = None
    o = _fused_recurrent_triton(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), scale,
        initial_state.contiguous() if initial_state is not None else None, final_state,
        cu_seqlens, N, use_qk_l2norm, A_log, dt_bias, use_beta_sigmoid,
    )
    return o, final_state
