"""Short causal depthwise convolution (+ SiLU) over tokens, channels last.

Legend: B batch, T tokens, D channels, W kernel width (2..8), N sequences (state rows).

    y[t, d] = act(bias[d] + sum_{j=0..W-1} weight[d, j] * x[t - (W-1) + j, d])

Inputs before a sequence's first token come from `initial_state[n, d, :]`, the W-1 inputs that
precede it, oldest first (zeros when None). This history is what context parallelism (the halo
of the preceding piece) and decoding (the rolling conv state) feed in.
"""
from typing import Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..utils import check_same_device, grad_destination, prepare_cu_seqlens, use_triton
from .torch_ref import torch_causal_conv1d, torch_causal_conv1d_update

MAX_WIDTH = 8
_ACTIVATIONS = (None, "silu")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Addressing: every tile has a reference token t0; its scalar base pointers carry the 64-bit
# offsets (batch, t0) and the per-element offsets are small int32 rows r relative to t0, which
# keeps the pointer tiles cheap in registers. lo = bos - t0 and hi = eos - t0 bound the rows of
# the tile's sequence. The forward and backward kernels read the history (and d final_state)
# as [N, W-1, D], channels contiguous, so those loads vectorise like the loads of x; the
# launchers transpose these small tensors.


@triton.jit
def _load_input(x_tile, h0, i_n, r, lo, m_r, o_d, m_d, stride_xt, stride_hn, stride_hk, stride_hd,
                W: tl.constexpr, HAS_H0: tl.constexpr):
    """Inputs at rows r ([BT], r >= -(W-1), relative to the tile) for channels o_d ([BD]) as
    fp32 [BT, BD]: from x for r >= lo, from history slot r - lo + W-1 of row i_n of h0 (element
    (n, k, d) at n*stride_hn + k*stride_hk + d*stride_hd) before the sequence start (zeros
    without history). Rows where m_r is false read nothing."""
    m_x = (m_r & (r >= lo))[:, None] & m_d[None, :]
    b_x = tl.load(x_tile + (r * stride_xt)[:, None] + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
    if HAS_H0:
        # only tiles within W-1 tokens of the sequence start touch the history
        if lo > 1 - W:
            m_h = (m_r & (r < lo))[:, None] & m_d[None, :]
            p_h = (h0 + i_n.to(tl.int64) * stride_hn + ((r - lo + (W - 1)) * stride_hk)[:, None]
                   + (o_d * stride_hd)[None, :])
            b_x += tl.load(p_h, mask=m_h, other=0.).to(tl.float32)
    return b_x


@triton.jit
def _sequence_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, IS_VARLEN: tl.constexpr):
    """(sequence row n, block index inside the sequence, first token, end token)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2)
        i_tc = tl.load(chunk_indices + i_t * 2 + 1)
        bos = tl.load(cu_seqlens + i_n)
        eos = tl.load(cu_seqlens + i_n + 1)
    else:
        i_n = i_b
        i_tc = i_t
        bos = i_b * 0
        eos = bos + T
    return i_n, i_tc, bos, eos


@triton.jit
def _conv_fwd_kernel(
    x, weight, bias, h0, y, cu_seqlens, chunk_indices,
    T, D, stride_xb, stride_xt,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """y for BT tokens x BD channels of one sequence; h0 is [N, W-1, D]."""
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_tc, bos, eos = _sequence_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, IS_VARLEN)
    t0 = bos + i_tc * BT
    o_r = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_r = o_r < eos - t0
    m_d = o_d < D
    x_tile = x + i_b.to(tl.int64) * stride_xb + t0.to(tl.int64) * stride_xt

    b_y = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        b_x = _load_input(x_tile, h0, i_n, o_r - (W - 1) + j, bos - t0, m_r, o_d, m_d, stride_xt,
                          (W - 1) * D, D, 1, W, HAS_H0)
        b_w = tl.load(weight + o_d * W + j, mask=m_d, other=0.).to(tl.float32)
        b_y += b_x * b_w[None, :]
    if HAS_BIAS:
        b_y += tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    y_tile = y + (i_b.to(tl.int64) * T + t0.to(tl.int64)) * D
    tl.store(y_tile + (o_r * D)[:, None] + o_d[None, :], b_y.to(y.dtype.element_ty),
             mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _conv_final_state_kernel(
    x, h0, ht, cu_seqlens,
    T, D, stride_xb, stride_xt,
    W: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """ht[n, :, k] = input at position eos - (W-1) + k of sequence n (history when before bos);
    h0 is [N, W-1, D], ht is [N, D, W-1]."""
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_b = i_n * 0
        bos = tl.load(cu_seqlens + i_n)
        eos = tl.load(cu_seqlens + i_n + 1)
    else:
        i_b = i_n
        bos = i_n * 0
        eos = bos + T
    t0 = eos - (W - 1)
    o_k = tl.arange(0, BK)
    o_d = i_d * BD + tl.arange(0, BD)
    m_k = o_k < W - 1
    m_d = o_d < D
    x_tile = x + i_b.to(tl.int64) * stride_xb + t0.to(tl.int64) * stride_xt
    b_h = _load_input(x_tile, h0, i_n, o_k, bos - t0, m_k, o_d, m_d, stride_xt, (W - 1) * D, D, 1, W, HAS_H0)
    p_h = ht + i_n.to(tl.int64) * D * (W - 1) + o_d[None, :] * (W - 1) + o_k[:, None]
    tl.store(p_h, b_h.to(ht.dtype.element_ty), mask=m_k[:, None] & m_d[None, :])


@triton.jit
def _load_row(x_row0, h0, i_n, p, bos, D, o_d, m_d, stride_xt, W: tl.constexpr, HAS_H0: tl.constexpr):
    """Input at token p (p >= bos - (W-1)) for channels o_d as fp32 [BD]: x when p >= bos, else
    history slot p - bos + W-1 of row i_n of h0 ([N, W-1, D]; zeros without history).
    x_row0 points at token 0 of the batch row."""
    b_x = tl.load(x_row0 + p.to(tl.int64) * stride_xt + o_d, mask=m_d & (p >= bos), other=0.).to(tl.float32)
    if HAS_H0:
        p_h = h0 + (i_n.to(tl.int64) * (W - 1) + (p - bos + (W - 1))) * D + o_d
        b_x += tl.load(p_h, mask=m_d & (p < bos), other=0.).to(tl.float32)
    return b_x


@triton.jit
def _tap(weight, o_d, m_d, j, W: tl.constexpr):
    return tl.load(weight + o_d * W + j, mask=m_d, other=0.).to(tl.float32)


@triton.jit
def _conv_bwd_kernel(
    x, weight, bias, h0, dy, dht, dx, dw_part, db_part, dh0, cu_seqlens, chunk_indices,
    T, D, NT, stride_xb, stride_xt, stride_dxb, stride_dxt,
    W: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dx, d initial_state and this program's partial sums of dweight / dbias over its tokens.

    With dpre the gradient at the SiLU input (the pre-activation recomputed from the inputs):
    dx[s] = sum_j w[j] dpre[s + W-1 - j]  (+ d final_state where s is among the last W-1 inputs)
    dw[j] = sum_t dpre[t] in[t - (W-1) + j],  db = sum_t dpre[t]

    A program owns L tokens [t0, t_end) of one sequence and BD channels. It walks the tokens
    once in order, t = t0 .. t_end + W-2, keeping a sliding window of the last W inputs
    (xl_k = in[t - k]) and of the last W dpre rows (pl_k = dpre[t - k]) in registers: one SiLU
    per token, and dx[t - (W-1)] is complete at step t. Blocks of R tokens are loaded as
    [R, BD] tiles (one memory latency per block) and split into rows by selects on the
    in-thread row axis. Window slots k >= W stay unused (W <= 8). Rows before t0 come from x
    or the history; at a sequence start, the outputs at s < bos are the history slots, i.e.
    d initial_state. h0, dht and dh0 are [N, W-1, D].
    """
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_tc, bos, eos = _sequence_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, IS_VARLEN)
    i_p = i_b.to(tl.int64) * NT + i_t
    t0 = bos + i_tc * L
    t_end = tl.minimum(t0 + L, eos)
    o_r = tl.arange(0, R)
    # contiguity capped at 2 channels: the compiler then vectorises by 2 along D and keeps the
    # R rows of a tile inside each thread (by 8 bf16 it would spread the rows over the warps)
    o_d = tl.max_contiguous(i_d * BD + tl.arange(0, BD), 2)
    m_d = o_d < D
    x_row0 = x + i_b.to(tl.int64) * stride_xb
    dy_row0 = dy + i_b.to(tl.int64) * T * D
    dx_row0 = dx + i_b.to(tl.int64) * stride_dxb

    # taps by lag (wl_k multiplies in[t - k]) and by index (wi_j = weight[:, j])
    zero = tl.zeros([BD], dtype=tl.float32)
    wl0, wl1, wl2, wl3, wl4, wl5, wl6, wl7 = zero, zero, zero, zero, zero, zero, zero, zero
    wi0, wi1, wi2, wi3, wi4, wi5, wi6, wi7 = zero, zero, zero, zero, zero, zero, zero, zero
    xl1, xl2, xl3, xl4, xl5, xl6, xl7 = zero, zero, zero, zero, zero, zero, zero
    pl1, pl2, pl3, pl4, pl5, pl6, pl7 = zero, zero, zero, zero, zero, zero, zero
    dwl0, dwl1, dwl2, dwl3, dwl4, dwl5, dwl6, dwl7 = zero, zero, zero, zero, zero, zero, zero, zero
    b_db = zero
    wl0 = _tap(weight, o_d, m_d, W - 1, W)
    wl1 = _tap(weight, o_d, m_d, W - 2, W)
    wi0 = _tap(weight, o_d, m_d, 0, W)
    wi1 = _tap(weight, o_d, m_d, 1, W)
    xl1 = _load_row(x_row0, h0, i_n, t0 - 1, bos, D, o_d, m_d, stride_xt, W, HAS_H0)
    if W > 2:
        wl2 = _tap(weight, o_d, m_d, W - 3, W)
        wi2 = _tap(weight, o_d, m_d, 2, W)
        xl2 = _load_row(x_row0, h0, i_n, t0 - 2, bos, D, o_d, m_d, stride_xt, W, HAS_H0)
    if W > 3:
        wl3 = _tap(weight, o_d, m_d, W - 4, W)
        wi3 = _tap(weight, o_d, m_d, 3, W)
        xl3 = _load_row(x_row0, h0, i_n, t0 - 3, bos, D, o_d, m_d, stride_xt, W, HAS_H0)
    if W > 4:
        wl4 = _tap(weight, o_d, m_d, W - 5, W)
        wi4 = _tap(weight, o_d, m_d, 4, W)
        xl4 = _load_row(x_row0, h0, i_n, t0 - 4, bos, D, o_d, m_d, stride_xt, W, HAS_H0)
    if W > 5:
        wl5 = _tap(weight, o_d, m_d, W - 6, W)
        wi5 = _tap(weight, o_d, m_d, 5, W)
        xl5 = _load_row(x_row0, h0, i_n, t0 - 5, bos, D, o_d, m_d, stride_xt, W, HAS_H0)
    if W > 6:
        wl6 = _tap(weight, o_d, m_d, W - 7, W)
        wi6 = _tap(weight, o_d, m_d, 6, W)
        xl6 = _load_row(x_row0, h0, i_n, t0 - 6, bos, D, o_d, m_d, stride_xt, W, HAS_H0)
    if W > 7:
        wl7 = _tap(weight, o_d, m_d, W - 8, W)
        wi7 = _tap(weight, o_d, m_d, 7, W)
        xl7 = _load_row(x_row0, h0, i_n, t0 - 7, bos, D, o_d, m_d, stride_xt, W, HAS_H0)
    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)

    # steps t0 .. t_end + W-2: the last W-1 only complete dx (look-ahead, no dweight)
    for i_blk in range(0, tl.cdiv(t_end - t0 + W - 1, R)):
        tb = t0 + i_blk * R
        o_t = tb + o_r
        m_t = (o_t < eos)[:, None] & m_d[None, :]
        b_x = tl.load(x_row0 + (o_t.to(tl.int64) * stride_xt)[:, None] + o_d[None, :], mask=m_t,
                      other=0.).to(tl.float32)
        b_dy = tl.load(dy_row0 + (o_t.to(tl.int64) * D)[:, None] + o_d[None, :], mask=m_t,
                       other=0.).to(tl.float32)
        b_dx = tl.zeros([R, BD], dtype=tl.float32)
        for r in tl.static_range(R):
            # row r of the tile; -0.0 is the exact additive identity, so the sum is a pick
            xl0 = tl.sum(tl.where(o_r[:, None] == r, b_x, -0.), axis=0)
            b_dp = tl.sum(tl.where(o_r[:, None] == r, b_dy, -0.), axis=0)
            if SILU:
                b_pre = wl0 * xl0 + wl1 * xl1
                if W > 2:
                    b_pre += wl2 * xl2
                if W > 3:
                    b_pre += wl3 * xl3
                if W > 4:
                    b_pre += wl4 * xl4
                if W > 5:
                    b_pre += wl5 * xl5
                if W > 6:
                    b_pre += wl6 * xl6
                if W > 7:
                    b_pre += wl7 * xl7
                if HAS_BIAS:
                    b_pre += b_bias
                b_sig = tl.sigmoid(b_pre)
                # d silu(p) / dp = sig(p) * (1 + p * (1 - sig(p)))
                b_dp = b_dp * b_sig * (1. + b_pre * (1. - b_sig))
            b_dpo = tl.where(tb + r < t_end, b_dp, 0.)
            b_db += b_dpo
            dwl0 += b_dpo * xl0
            dwl1 += b_dpo * xl1
            b_dxr = wi0 * b_dp + wi1 * pl1
            if W > 2:
                dwl2 += b_dpo * xl2
                b_dxr += wi2 * pl2
            if W > 3:
                dwl3 += b_dpo * xl3
                b_dxr += wi3 * pl3
            if W > 4:
                dwl4 += b_dpo * xl4
                b_dxr += wi4 * pl4
            if W > 5:
                dwl5 += b_dpo * xl5
                b_dxr += wi5 * pl5
            if W > 6:
                dwl6 += b_dpo * xl6
                b_dxr += wi6 * pl6
            if W > 7:
                dwl7 += b_dpo * xl7
                b_dxr += wi7 * pl7
            b_dx = tl.where(o_r[:, None] == r, b_dxr[None, :], b_dx)
            if W > 7:
                xl7, pl7 = xl6, pl6
            if W > 6:
                xl6, pl6 = xl5, pl5
            if W > 5:
                xl5, pl5 = xl4, pl4
            if W > 4:
                xl4, pl4 = xl3, pl3
            if W > 3:
                xl3, pl3 = xl2, pl2
            if W > 2:
                xl2, pl2 = xl1, pl1
            xl1, pl1 = xl0, b_dp

        # row r of b_dx is the gradient of the input at s = tb + r - (W-1)
        o_s = o_t - (W - 1)
        if HAS_DHT:
            # slot k of the final state is the input at eos - (W-1) + k
            k_f = o_s - (eos - (W - 1))
            m_f = ((k_f >= 0) & (o_s < eos))[:, None] & m_d[None, :]
            p_f = dht + (i_n.to(tl.int64) * (W - 1) + k_f)[:, None] * D + o_d[None, :]
            b_dx += tl.load(p_f, mask=m_f, other=0.).to(tl.float32)
        m_s = ((o_s >= t0) & (o_s < t_end))[:, None] & m_d[None, :]
        tl.store(dx_row0 + (o_s.to(tl.int64) * stride_dxt)[:, None] + o_d[None, :], b_dx.to(dx.dtype.element_ty),
                 mask=m_s)
        if HAS_H0:
            # before the sequence start the outputs are the history slots (first span only)
            k_h = o_s - (bos - (W - 1))
            m_h = ((o_s < bos) & (i_tc == 0))[:, None] & m_d[None, :]
            p_h = dh0 + (i_n.to(tl.int64) * (W - 1) + k_h)[:, None] * D + o_d[None, :]
            tl.store(p_h, b_dx, mask=m_h)

    p_dw = dw_part + i_p * D * W + o_d * W
    tl.store(p_dw + (W - 1), dwl0, mask=m_d)
    tl.store(p_dw + (W - 2), dwl1, mask=m_d)
    if W > 2:
        tl.store(p_dw + (W - 3), dwl2, mask=m_d)
    if W > 3:
        tl.store(p_dw + (W - 4), dwl3, mask=m_d)
    if W > 4:
        tl.store(p_dw + (W - 5), dwl4, mask=m_d)
    if W > 5:
        tl.store(p_dw + (W - 6), dwl5, mask=m_d)
    if W > 6:
        tl.store(p_dw + (W - 7), dwl6, mask=m_d)
    if W > 7:
        tl.store(p_dw + (W - 8), dwl7, mask=m_d)
    if HAS_BIAS:
        tl.store(db_part + i_p * D + o_d, b_db, mask=m_d)


@triton.jit
def _conv_update_kernel(
    x, conv_state, weight, bias, y,
    T, D, stride_xb, stride_xt,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    """One program per (batch row, channel block): outputs for all T tokens, then the state
    (conv_state is [B, D, W-1], contiguous)."""
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_r = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    x_base = x + i_b.to(tl.int64) * stride_xb
    for i_t in range(0, tl.cdiv(T, BT)):
        t0 = i_t * BT
        m_r = o_r < T - t0
        b_y = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(W):
            b_x = _load_input(x_base + t0 * stride_xt, conv_state, i_b, o_r - (W - 1) + j, -t0, m_r,
                              o_d, m_d, stride_xt, D * (W - 1), 1, W - 1, W, True)
            b_w = tl.load(weight + o_d * W + j, mask=m_d, other=0.).to(tl.float32)
            b_y += b_x * b_w[None, :]
        if HAS_BIAS:
            b_y += tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
        if SILU:
            b_y = b_y * tl.sigmoid(b_y)
        y_tile = y + (i_b.to(tl.int64) * T + t0) * D
        tl.store(y_tile + (o_r * D)[:, None] + o_d[None, :], b_y.to(y.dtype.element_ty),
                 mask=m_r[:, None] & m_d[None, :])
    o_k = tl.arange(0, BK)
    m_k = o_k < W - 1
    t0 = T - (W - 1)
    b_s = _load_input(x_base + t0 * stride_xt, conv_state, i_b, o_k, -t0, m_k, o_d, m_d, stride_xt,
                      D * (W - 1), 1, W - 1, W, True)
    # every thread of the program must have read the old state before any thread overwrites it
    tl.debug_barrier()
    p_s = conv_state + i_b.to(tl.int64) * D * (W - 1) + o_d[None, :] * (W - 1) + o_k[:, None]
    tl.store(p_s, b_s.to(conv_state.dtype.element_ty), mask=m_k[:, None] & m_d[None, :])


# Forward (BT, BD, num_warps) = 16 tokens x 128 channels (256 contiguous bytes per row in
# bf16), no spills on sm_90. Backward (L, R, BD, num_warps): a program walks L = 128 tokens of
# 256 channels in blocks of R = 8 rows; each of the 128 threads holds 2 channels of every row
# of a tile (a warp reads 128 contiguous bytes per row in bf16). Compiled for sm_90: 128
# registers at W = 4 (4 programs = 16 warps per SM), 168 at W = 8, no spills (C's tl.gather
# version: 203 registers with 8 warps, one program per SM). The per-program dweight partials
# [B T / L, D, W] fp32 are 1/16 of the bytes of a bf16 x at W = 4.
FWD_CONFIG = (16, 128, 4)
BWD_CONFIG = (128, 8, 256, 4)


def _chunk_indices(cu_list: List[int], BT: int, device) -> torch.Tensor:
    """[num_blocks, 2] int32 (sequence, block inside it); an empty sequence still gets one block
    so its initial-state gradient and final state are written."""
    cu = torch.tensor(cu_list, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    blocks = torch.clamp((lens + BT - 1) // BT, min=1)
    seq = torch.repeat_interleave(torch.arange(len(lens)), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    inner = torch.arange(int(blocks.sum())) - first[seq]
    return torch.stack([seq, inner], dim=1).to(torch.int32).to(device)


def _as_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _conv_forward(x, weight, bias, activation, h0_nkd, output_final_state, cu_seqlens_i32, cu_list):
    """h0_nkd: the initial state as [N, W-1, D] (or None); returns y and the final state [N, D, W-1]."""
    B, T, D = x.shape
    W = weight.shape[1]
    BT, BD, warps = FWD_CONFIG
    BD = min(BD, triton.next_power_of_2(D))
    varlen = cu_list is not None
    N = len(cu_list) - 1 if varlen else B
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    chunk_indices = _chunk_indices(cu_list, BT, x.device) if varlen else None
    # never an empty grid: T == 0 launches one fully masked block
    grid = (chunk_indices.shape[0] if varlen else max(1, triton.cdiv(T, BT)), triton.cdiv(D, BD), 1 if varlen else B)
    _conv_fwd_kernel[grid](
        x, weight, bias, h0_nkd, y, cu_seqlens_i32, chunk_indices,
        T, D, x.stride(0), x.stride(1),
        W=W, BT=BT, BD=BD, HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_H0=h0_nkd is not None, IS_VARLEN=varlen, num_warps=warps,
    )
    final_state = None
    if output_final_state:
        final_state = torch.empty(N, D, W - 1, dtype=x.dtype, device=x.device)
        _conv_final_state_kernel[(N, triton.cdiv(D, BD))](
            x, h0_nkd, final_state, cu_seqlens_i32,
            T, D, x.stride(0), x.stride(1),
            W=W, BK=triton.next_power_of_2(W - 1), BD=BD,
            HAS_H0=h0_nkd is not None, IS_VARLEN=varlen, num_warps=1,
        )
    return y, final_state


def _conv_backward(x, weight, bias, activation, h0_nkd, dy, dht_nkd, cu_seqlens_i32, cu_list, dx_into=None):
    """h0_nkd, dht_nkd: [N, W-1, D] or None; returns dx (written into `dx_into()` when given:
    see causal_conv1d), dweight, dbias, d initial_state [N, D, W-1]."""
    B, T, D = x.shape
    W = weight.shape[1]
    L, R, BD, warps = BWD_CONFIG
    BD = min(BD, triton.next_power_of_2(D))
    varlen = cu_list is not None
    chunk_indices = _chunk_indices(cu_list, L, x.device) if varlen else None
    # never an empty grid: T == 0 launches one fully masked block, which still writes d initial_state
    NT = chunk_indices.shape[0] if varlen else max(1, triton.cdiv(T, L))
    n_part = NT * (1 if varlen else B)
    dx = grad_destination(dx_into, x)
    if dx is None:
        dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    # per-program partials, reduced below in a fixed order (deterministic): n_part * D * W fp32,
    # 1/16 of the bytes of a bf16 x at W = 4
    dw_part = torch.empty(n_part, D, W, dtype=torch.float32, device=x.device)
    db_part = torch.empty(n_part, D, dtype=torch.float32, device=x.device) if bias is not None else None
    dh0 = torch.empty(h0_nkd.shape, dtype=torch.float32, device=x.device) if h0_nkd is not None else None
    grid = (NT, triton.cdiv(D, BD), 1 if varlen else B)
    _conv_bwd_kernel[grid](
        x, weight, bias, h0_nkd, dy, dht_nkd, dx, dw_part, db_part, dh0, cu_seqlens_i32, chunk_indices,
        T, D, NT, x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
        W=W, L=L, R=R, BD=BD,
        HAS_BIAS=bias is not None, SILU=activation == "silu", HAS_H0=h0_nkd is not None,
        HAS_DHT=dht_nkd is not None, IS_VARLEN=varlen, num_warps=warps,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    dh0 = dh0.transpose(1, 2).contiguous().to(h0_nkd.dtype) if dh0 is not None else None
    return dx, dw, db, dh0


class CausalConv1dFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, activation, output_final_state, cu_seqlens_i32, cu_list,
                dx_into=None):
        x = _as_channels_last(x)
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        h0_nkd = initial_state.transpose(1, 2).contiguous() if initial_state is not None else None
        y, final_state = _conv_forward(x, weight, bias, activation, h0_nkd, output_final_state,
                                       cu_seqlens_i32, cu_list)
        ctx.save_for_backward(x, weight, bias, h0_nkd, cu_seqlens_i32)
        ctx.activation = activation
        ctx.cu_list = cu_list
        ctx.dx_into = dx_into
        ctx.set_materialize_grads(False)
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dht):
        x, weight, bias, h0_nkd, cu_seqlens_i32 = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dht_nkd = dht.transpose(1, 2).contiguous() if dht is not None else None
        dx, dw, db, dh0 = _conv_backward(x, weight, bias, ctx.activation, h0_nkd, dy, dht_nkd,
                                         cu_seqlens_i32, ctx.cu_list, ctx.dx_into)
        # activation, output_final_state, cu_seqlens_i32, cu_list, dx_into: not differentiable
        return dx, dw, db, dh0, None, None, None, None, None


def triton_causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens, cu_list,
                         dx_into=None):
    """Triton path of `causal_conv1d` (arguments already validated)."""
    cu_i32 = cu_seqlens.to(torch.int32) if cu_seqlens is not None else None
    return CausalConv1dFunction.apply(x, weight, bias, initial_state, activation, output_final_state,
                                      cu_i32, cu_list, dx_into)


def triton_causal_conv1d_update(x, conv_state, weight, bias, activation):
    """Triton path of `causal_conv1d_update` (x: [B, T, D]; arguments already validated)."""
    B, T, D = x.shape
    W = weight.shape[1]
    x = _as_channels_last(x)
    state = conv_state if conv_state.is_contiguous() else conv_state.contiguous()
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    BD = min(128, triton.next_power_of_2(D))
    _conv_update_kernel[(B, triton.cdiv(D, BD))](
        x, state, weight.contiguous(), bias.contiguous() if bias is not None else None, y,
        T, D, x.stride(0), x.stride(1),
        W=W, BT=min(16, triton.next_power_of_2(T)), BD=BD, BK=triton.next_power_of_2(W - 1),
        HAS_BIAS=bias is not None, SILU=activation == "silu", num_warps=4,
    )
    if state is not conv_state:
        conv_state.copy_(state)
    return y


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
    *,
    dx_into: Optional[Callable[[], torch.Tensor]] = None,
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
        dx_into: a hint for the backward: a function, called once there, returning the tensor
            (x's shape and dtype, channel stride 1, any batch and token strides) that the Triton
            backward writes x's gradient into, e.g. a slice of one gradient buffer for a fused
            projection's sections, so that no concatenation follows. The torch path and a
            tensor that does not fit ignore it (a new tensor is allocated).
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
        return triton_causal_conv1d(x, weight, bias, activation, initial_state, output_final_state,
                                    cu_seqlens, cu_list, dx_into)
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
            y = triton_causal_conv1d_update(x_btd, conv_state, weight, bias, activation)
        else:
            y = torch_causal_conv1d_update(x_btd, conv_state, weight, bias, activation)
    return y[:, 0] if single else y
