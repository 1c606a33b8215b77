"""Chunked gated delta rule on Triton: the autograd Function and the public entry point.

Legend: B batch, T tokens per batch row, H key heads, HV value heads (G = HV // H value heads
per key head), K key dim, V value dim, N state rows (sequences), C = 64 chunk size,
NT total number of chunks over all sequences.

Forward (kernels in chunk_fwd.py, three launches):
  1. `chunk_prepare_fwd`: per (chunk, value head): gate activation + chunk-local cumsum gc,
     beta activation, the l2-norm statistics of k, A = beta K K^T * decay, Tm = (I + A)^-1
     (16x16 diagonal blocks by substitution, then a terminating series), w = Tm (beta e^gc k),
     u = Tm (beta v), with the Tm @ x dots in bf16 / fp16 for half inputs; Tm itself is kept
     for the backward ([B, T, HV, 64] in v's dtype).
  2. `chunk_state_fwd`: one program per (sequence, value head, V block), the state in fp32
     registers: v_new = u - w h, h <- e^{gc_last} h + (k e^{gc_last - gc})^T v_new. Stores the
     state entering every chunk, v_new and the final state.
  3. `chunk_output_fwd`: per (chunk, value head, V block):
     o = scale ((q e^gc) h + (M (q k^T)) v_new), also the l2-norm statistics of q.

Interface with the backward (kernels/gated_delta_rule/chunk_bwd.py), fixed:

    dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_bwd(
        q, k, v, gc, beta, scale, initial_state, do, dht, layout,
        q_rstd=q_rstd, k_rstd=k_rstd, g=g, tm=tm, states=states)

  - q, k: the raw inputs as passed by the user, [B, T, H, K], contiguous; v: [B, T, HV, V].
  - gc: [B, T, HV] float32, inclusive cumsum of the activated per-token log decay g inside
    each chunk (restarts at every chunk and sequence start).
  - beta: [B, T, HV] float32, the activated beta (after the sigmoid if that option is on).
  - scale: float; initial_state: [N, HV, K, V] float32 or None; do: [B, T, HV, V] contiguous,
    v's dtype; dht: [N, HV, K, V] float32 or None (gradient arriving at the final state).
  - layout: `ChunkLayout` (chunk_fwd.py): the chunk table for packed sequences.
  - q_rstd, k_rstd: [B, T, H] float32 rsqrt(sum_K x^2 + 1e-6), or None when the l2-norm
    option is off. When given, the kernels use q * q_rstd, k * k_rstd and return the
    gradients of the raw q, k (dx = rstd (dxn - xn sum_K(dxn xn))).
  Returns: dq, dk in q's dtype and shape (summed over the G value heads of a group), dv in v's
  dtype, dg [B, T, HV] float32 = gradient of the per-token activated g (not of gc),
  dbeta [B, T, HV] float32 = gradient of the activated beta, dh0 [N, HV, K, V] float32 or
  None when initial_state is None.
  - g: [B, T, HV] float32, the activated per-token log decay (computed here on [B, T, HV]
    from the saved raw gate input), for an fp32-accurate dg under strong decay.
  - tm: the forward's Tm (above), or None: the backward then forms it again.
  - states: (h, v_new) of the forward's state pass (`keep_states`), or None: the backward
    then runs that pass again (below).
  The chain rule through the gate activation (A_log, dt_bias, a) and the beta sigmoid is done
  here, on [B, T, HV] tensors, by gate.py's one launch.

  The backward recomputes the rest of what it needs (w, u from the saved Tm in its prep
  launch; without Tm the forward building block `chunk_wy_fwd(k, v, gc, beta, layout, k_rstd)`
  -> (w, u) computes the same) and
  `chunk_state_fwd(k, w, u, gc, layout, initial_state, False, k_rstd)` -> (h, v_new, None),
  h: [NT, HV, K, V] in k's dtype, the state entering each chunk (global chunk index: for
  B > 1 without cu_seqlens, chunk c of batch row b is b * ceil(T / 64) + c).

Context parallelism: `chunk_affine_summary(k, w, u, gc, layout, k_rstd)` (chunk_fwd.py) gives
per sequence S_out = M S_in + H (M [N, HV, K, K], H [N, HV, K, V], float32) from the same w, u.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..utils.tuning import INTERPRET
from .chunk_fwd import (
    chunk_output_fwd,
    chunk_prepare_fwd,
    chunk_state_fwd,
    make_chunk_layout,
)
from .gate import gate_activation, gate_backward

__all__ = ["chunk_gated_delta_rule_triton"]


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, scale, output_final_state,
                cu_seqlens, use_qk_l2norm, use_beta_sigmoid, keep_states):
        B, T, H, K = q.shape
        layout = make_chunk_layout(cu_seqlens, B, T)
        # each chunk's Tm = (I + A)^-1, kept for the backward ([B, T, HV, 64] in v's dtype, a
        # quarter of v at V = 256, half at 128): its prep then neither forms k k^T nor inverts
        tm = torch.empty(B, T, v.shape[2], 64, dtype=v.dtype, device=v.device)
        gc, beta_act, k_rstd, w, u = chunk_prepare_fwd(
            k, v, g, beta, layout, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid=use_beta_sigmoid, use_qk_l2norm=use_qk_l2norm, tm_out=tm,
        )
        h, v_new, final_state = chunk_state_fwd(
            k, w, u, gc, layout, initial_state, output_final_state, k_rstd=k_rstd,
        )
        del w, u
        o, q_rstd = chunk_output_fwd(
            q, k, v_new, h, gc, scale, layout, k_rstd=k_rstd, use_qk_l2norm=use_qk_l2norm,
        )
        if not keep_states:
            h = v_new = None
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, initial_state, gc, beta_act,
                              q_rstd, k_rstd, tm, h, v_new)
        ctx.layout = layout
        ctx.scale = scale
        ctx.use_beta_sigmoid = use_beta_sigmoid
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        from .chunk_bwd import chunk_gated_delta_rule_bwd

        (q, k, v, g, beta, A_log, dt_bias, initial_state, gc, beta_act,
         q_rstd, k_rstd, tm, h, v_new) = ctx.saved_tensors
        # the per-token activated decay: exact dg under strong decay (differences of gc
        # lose ~ulp(|gc|)); [B, T, HV] only, the forward's softplus (gate.py)
        g_act = g.float() if A_log is None else gate_activation(g, A_log, dt_bias)
        dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_bwd(
            q, k, v, gc, beta_act, ctx.scale, initial_state, do.contiguous(),
            # e.g. final_state.sum().backward() hands in a stride-0 expanded tensor
            None if dht is None else dht.float().contiguous(), ctx.layout,
            q_rstd=q_rstd, k_rstd=k_rstd, g=g_act, tm=tm,
            states=None if h is None else (h, v_new),
        )
        # the gate's and the beta sigmoid's chain rule in one launch (gate.py); without either,
        # only the casts to the inputs' dtypes (none for fp32 inputs)
        if A_log is None and not ctx.use_beta_sigmoid:
            dg, dbeta, dA_log, ddt_bias = dg.to(g.dtype), dbeta.to(beta.dtype), None, None
        else:
            dg, dA_log, ddt_bias, dbeta = gate_backward(
                g, A_log, dt_bias, dg, dbeta, beta_act if ctx.use_beta_sigmoid else None,
                beta.dtype)
        if initial_state is None:
            dh0 = None
        return (
            dq, dk, dv, dg, dbeta,
            dA_log, ddt_bias, dh0,
            None,  # scale
            None,  # output_final_state
            None,  # cu_seqlens
            None,  # use_qk_l2norm
            None,  # use_beta_sigmoid
            None,  # keep_states
        )


def chunk_gated_delta_rule_triton(
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
    keep_states: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Triton chunked gated delta rule (arguments already validated by api.py).

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V]; g (log decay, or the raw gate input `a` when
        A_log is given), beta (or its logits with use_beta_sigmoid): [B, T, HV].
        initial_state: [N, HV, K, V] float32 or None; cu_seqlens: [N + 1] with B == 1.
        keep_states: save the forward's per-chunk states h and v_new for the backward (which
        then skips its state pass) instead of recomputing them there.
    Returns:
        o: [B, T, HV, V] in v's dtype; final_state: [N, HV, K, V] float32 or None.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    K, V = q.shape[-1], v.shape[-1]
    Kp, Vp = padded_head_dims(K, V)
    if (Kp, Vp) != (K, V):
        # zero key columns change no dot product and no norm; zero value columns give zero
        # output / state columns: slicing them off is exact, and autograd slices the gradients
        q, k = (F.pad(x, (0, Kp - K)) for x in (q, k))
        v = F.pad(v, (0, Vp - V))
        if initial_state is not None:
            initial_state = F.pad(initial_state, (0, Vp - V, 0, Kp - K))
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    o, final_state = ChunkGatedDeltaRuleFunction.apply(
        q, k, v, g, beta, A_log, dt_bias, initial_state, float(scale), output_final_state,
        cu_seqlens, use_qk_l2norm, use_beta_sigmoid, keep_states,
    )
    if (Kp, Vp) != (K, V):
        o = o[..., :V]
        if final_state is not None:
            final_state = final_state[..., :K, :V]
    return o, final_state


# Compiled (not interpreted) launches take head dims of at least this size: on H200 with triton
# 3.6, the backward at K or V in {16, 32} in bf16 gave NaN gradients and an illegal memory access
# (GPU test log of 2026-11-27) while fp32 and the real shapes (K, V >= 128) were right. Real models
# use K, V >= 64; smaller heads (tests, toy models) are zero-padded up to it.
MIN_COMPILED_HEAD_DIM = 64


def padded_head_dims(K: int, V: int) -> Tuple[int, int]:
    """(K, V) as the compiled kernels run them: each raised to MIN_COMPILED_HEAD_DIM (under the
    Triton interpreter, where small heads are exact, unchanged)."""
    if INTERPRET:
        return K, V
    return max(K, MIN_COMPILED_HEAD_DIM), max(V, MIN_COMPILED_HEAD_DIM)
