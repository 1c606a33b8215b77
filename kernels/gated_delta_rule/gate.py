"""The gate's and beta's elementwise work around the chunked rule's backward, one launch each.

Legend: R = B * T token rows, HV value heads; a [R, HV] the raw gate input (the `g` argument
when A_log is given), A_log, dt_bias [HV] float32.

    g    = -exp(A_log) softplus(a + dt_bias)                         (the activated log decay)
    da   = dg * dg/da = -dg exp(A_log) sigmoid(a + dt_bias)
    dA_log  = sum_rows -dg exp(A_log) softplus(a + dt_bias),   ddt_bias = sum_rows da
    dbeta_logit = dbeta beta (1 - beta)                          (with the beta sigmoid)

The backward needs g itself (`gate_activation`: the chunk kernels take the per-token decay for
an fp32-exact dg) and the chain rule above (`gate_backward`): in torch these were ~30 small
kernels per layer (~0.13 ms at 16K tokens), here two launches and two [programs, HV] sums. The
softplus is the forward prepare kernel's (`triton_helpers.softplus`), so the backward's g is
the forward's bit for bit.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..utils.triton_helpers import softplus

__all__ = ["gate_activation", "gate_backward"]


@triton.jit
def _gate_act_kernel(a, a_log, dt_bias, g, R, HV: tl.constexpr, HVP: tl.constexpr,
                     BR: tl.constexpr, HAS_DT_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, HVP)
    m_c = cols < HV
    m = (rows < R)[:, None] & m_c[None, :]
    idx = rows.to(tl.int64)[:, None] * HV + cols[None, :]
    x = tl.load(a + idx, mask=m, other=0.).to(tl.float32)
    if HAS_DT_BIAS:
        x += tl.load(dt_bias + cols, mask=m_c, other=0.).to(tl.float32)[None, :]
    decay = tl.exp(tl.load(a_log + cols, mask=m_c, other=0.).to(tl.float32))
    tl.store(g + idx, -decay[None, :] * softplus(x), mask=m)


@triton.jit
def _gate_bwd_kernel(a, a_log, dt_bias, dg, da, dbeta, beta, dbeta_out, dA_part, ddt_part, R,
                     HV: tl.constexpr, HVP: tl.constexpr, BR: tl.constexpr,
                     HAS_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr):
    """da (a's dtype) and this program's sums over its rows of the A_log / dt_bias terms
    ([HV] each, into row program_id of the parts); dbeta_out (beta's dtype) = dbeta, times
    beta (1 - beta) with the sigmoid. Without the fused gate, da = dg cast."""
    i_p = tl.program_id(0)
    rows = i_p * BR + tl.arange(0, BR)
    cols = tl.arange(0, HVP)
    m_c = cols < HV
    m = (rows < R)[:, None] & m_c[None, :]
    idx = rows.to(tl.int64)[:, None] * HV + cols[None, :]
    b_dg = tl.load(dg + idx, mask=m, other=0.)
    if HAS_GATE:
        x = tl.load(a + idx, mask=m, other=0.).to(tl.float32)
        if HAS_DT_BIAS:
            x += tl.load(dt_bias + cols, mask=m_c, other=0.).to(tl.float32)[None, :]
        decay = tl.exp(tl.load(a_log + cols, mask=m_c, other=0.).to(tl.float32))[None, :]
        b_da = -b_dg * decay * tl.sigmoid(x)
        # masked rows hold dg = 0: they add nothing to the sums
        tl.store(dA_part + i_p * HV + cols, tl.sum(-b_dg * decay * softplus(x), axis=0), mask=m_c)
        if HAS_DT_BIAS:
            tl.store(ddt_part + i_p * HV + cols, tl.sum(b_da, axis=0), mask=m_c)
    else:
        b_da = b_dg
    tl.store(da + idx, b_da.to(da.dtype.element_ty), mask=m)
    b_db = tl.load(dbeta + idx, mask=m, other=0.)
    if BETA_SIGMOID:
        b_beta = tl.load(beta + idx, mask=m, other=0.)
        b_db = b_db * b_beta * (1. - b_beta)
    tl.store(dbeta_out + idx, b_db.to(dbeta_out.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> Tuple[int, int, int, int]:
    """(R, HV, HVP, BR): token rows, heads, heads padded to a power of two, rows per program
    (~2K elements a program)."""
    HV = x.shape[-1]
    R = x.numel() // HV
    HVP = triton.next_power_of_2(HV)
    return R, HV, HVP, max(1, min(256, 2048 // HVP))


def gate_activation(a: torch.Tensor, A_log: torch.Tensor, dt_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """g = -exp(A_log) softplus(a + dt_bias), float32, a's shape ([..., HV], contiguous)."""
    R, HV, HVP, BR = _rows(a)
    g = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    if R:
        _gate_act_kernel[(triton.cdiv(R, BR),)](a, A_log, dt_bias, g, R, HV=HV, HVP=HVP, BR=BR,
                                                HAS_DT_BIAS=dt_bias is not None, num_warps=4)
    return g


def gate_backward(a: torch.Tensor, A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                  dg: torch.Tensor, dbeta: torch.Tensor, beta: Optional[torch.Tensor],
                  beta_dtype: torch.dtype):
    """The chain rule from the chunk backward's dg, dbeta ([..., HV] float32, contiguous) to
    the inputs: (da in a's dtype, dA_log [HV] fp32 or None, ddt_bias [HV] fp32 or None,
    dbeta in beta_dtype). A_log None: da = dg (no fused gate). beta: the activated beta when
    the sigmoid is fused (dbeta then goes through it), else None."""
    R, HV, HVP, BR = _rows(dg)
    n_prog = max(1, triton.cdiv(R, BR))
    da = torch.empty(dg.shape, dtype=a.dtype, device=dg.device)
    dbeta_out = torch.empty(dg.shape, dtype=beta_dtype, device=dg.device)
    has_gate = A_log is not None
    has_dt = has_gate and dt_bias is not None
    parts = torch.zeros(2 if has_gate else 0, n_prog, HV, dtype=torch.float32, device=dg.device)
    if R:
        _gate_bwd_kernel[(n_prog,)](
            a, A_log, dt_bias, dg, da, dbeta, beta, dbeta_out,
            parts[0] if has_gate else None, parts[1] if has_dt else None, R,
            HV=HV, HVP=HVP, BR=BR, HAS_GATE=has_gate, HAS_DT_BIAS=has_dt,
            BETA_SIGMOID=beta is not None, num_warps=4)
    dA_log = parts[0].sum(0) if has_gate else None
    ddt_bias = parts[1].sum(0) if has_dt else None
    return da, dA_log, ddt_bias, dbeta_out
