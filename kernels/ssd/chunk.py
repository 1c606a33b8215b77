"""Chunked scalar-decay linear attention (Mamba2 SSD) on Triton: kernels, launchers, the
autograd Function and the Triton entry point.

Legend: B batch, T tokens per batch row, G q/k groups, HV value heads (R = HV // G per group),
N state dim (q/k head dim), P value head dim, NS state rows (sequences), C = 64 chunk size,
NTC total number of chunks over all sequences (chunk table of kernels/gated_delta_rule).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = scale S_t^T q_t

Forward, three launches:
  1. `_cumsum_kernel`, per (chunk, head block): gc = in-chunk inclusive cumsum of g (fp32).
  2. `_state_fwd_kernel`, per (N x P block, value head, sequence), the state in fp32 registers
     (blocks as small as 32 x 32 when there are few heads and sequences, `_state_blocks`):
     store h_c (state entering chunk c), h <- exp(gc_last) h + (k exp(gc_last - gc))^T v.
  3. `_output_fwd_kernel`, per (P block, block of value heads of a group, chunk; q k^T once
     for the block's heads, MAX_HEADS_PER_PROGRAM):
     o = scale ((q exp(gc)) h_c + (exp(gc_i - gc_j) [j <= i] * q k^T) v).
Backward, two launches (h is recomputed by 2., on a GPU on a side stream beside 4., which does
not read it: OVERLAP_STREAMS):
  4. `_state_bwd_kernel`, per (N x P block, value head, sequence), reverse over chunks:
     store dh_c (gradient of the state LEAVING chunk c),
     dh <- exp(gc_last) dh + scale (q exp(gc))^T do; what is left at the start is dh0.
  5. `_chunk_bwd_kernel`, per (block of value heads of a group, chunk; up to eight heads by default,
     MAX_HEADS_PER_PROGRAM), whole N and P:
     dq, dk (summed over the block's heads in registers, over the blocks afterwards), dv and
     dg, with
        dgc_i = q_i . dq_i - k_i . dk_i + [i = last] (exp(gc_last) <h_c, dh_c> + sum_j k_j . dk^S_j)
     (dq^S / dk^S the parts through the states) and dg = the in-chunk reverse cumsum of dgc,
     evaluated with the diagonal pair terms cancelled analytically (see the kernel).
Exponents exp(gc_i - gc_j) only for j <= i (and gc_last - gc_j), so never above 1.
With a per-token value scale vs [B, T, HV] (Mamba2's dt: v = x dt), launches 2, 3 and 5 read v
as v * vs (`_load_v`) and 5 returns x's gradient vs dv and dvs = sum_p x dv: the product is
never stored, nor its gradient. With a skip weight dsk [HV, P] (Mamba2's D), launch 3 adds
dsk * v (the unscaled v) to o and 5 adds dsk do to v's gradient and writes dsk's per chunk.
"""
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..gated_delta_rule.chunk_fwd import make_chunk_layout
from ..utils.streams import beside
from ..utils.triton_helpers import chunk_bounds, sequence_bounds
from ..utils.tuning import INTERPRET

__all__ = ["chunk_scalar_decay_triton"]

BT = 64
# the backward's recomputing state pass on a side stream beside the reverse pass (True) or
# before it on the caller's stream (False; always so off the GPU and under CUDA graph capture):
# a module switch for benchmarks/bench_ssd.py --ab-overlap. On from its prediction, not yet
# timed on a GPU
OVERLAP_STREAMS = True


@triton.jit
def _cumsum_kernel(g, gc, cu_seqlens, chunk_indices, T, NT_SEQ, HV: tl.constexpr,
                   BT: tl.constexpr, BH: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, BT, IS_VARLEN)
    o_t = (t0 + tl.arange(0, BT)).to(tl.int64)
    o_h = i_h * BH + tl.arange(0, BH)
    m = (o_t < eos)[:, None] & (o_h < HV)[None, :]
    p = o_t[:, None] * HV + o_h[None, :]
    b_g = tl.load(g + p, mask=m, other=0.).to(tl.float32)
    tl.store(gc + p, tl.cumsum(b_g, axis=0), mask=m)


@triton.jit
def _load_v(v, vs, o_t, i_hv, o_p, m_tp, m_t, HV: tl.constexpr, P: tl.constexpr, HAS_VS: tl.constexpr):
    """v's [BT, BP] tile of value head i_hv; with HAS_VS read as v * vs (vs [B, T, HV] fp32, a
    per-token scale: Mamba2's x * dt), rounded to v's dtype as the product would be stored."""
    b_v = tl.load(v + (o_t * HV + i_hv)[:, None] * P + o_p[None, :], mask=m_tp, other=0.)
    if HAS_VS:
        b_vs = tl.load(vs + o_t * HV + i_hv, mask=m_t, other=0.)
        b_v = (b_v.to(tl.float32) * b_vs[:, None]).to(v.dtype.element_ty)
    return b_v


@triton.jit
def _state_fwd_kernel(k, v, vs, gc, h, h0, ht, cu_seqlens, chunk_offsets, T, NT_SEQ,
                      G: tl.constexpr, HV: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
                      BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                      USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, HAS_VS: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    i_np, i_hv, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_p, i_nb = i_np % tl.cdiv(P, BP), i_np // tl.cdiv(P, BP)
    i_g = i_hv // (HV // G)
    bos, eos, nt, c_off = sequence_bounds(i_n, cu_seqlens, chunk_offsets, T, NT_SEQ, BT, IS_VARLEN)
    o_n = i_nb * BN + tl.arange(0, BN)
    o_p = i_p * BP + tl.arange(0, BP)
    m_np = (o_n < N)[:, None] & (o_p < P)[None, :]
    p_np = o_n[:, None] * P + o_p[None, :]
    row = i_n * HV + i_hv
    b_h = tl.zeros([BN, BP], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + row.to(tl.int64) * N * P + p_np, mask=m_np, other=0.)
    for i_t in range(0, nt):
        t0 = bos + i_t * BT
        tl.store(h + ((c_off + i_t) * HV + i_hv).to(tl.int64) * N * P + p_np,
                 b_h.to(h.dtype.element_ty), mask=m_np)
        o_t = (t0 + tl.arange(0, BT)).to(tl.int64)
        m_t = o_t < eos
        b_k = tl.load(k + (o_t * G + i_g)[:, None] * N + o_n[None, :],
                      mask=m_t[:, None] & (o_n < N)[None, :], other=0.)
        b_v = _load_v(v, vs, o_t, i_hv, o_p, m_t[:, None] & (o_p < P)[None, :], m_t, HV, P, HAS_VS)
        b_gc = tl.load(gc + o_t * HV + i_hv, mask=m_t, other=0.)
        b_glast = tl.load(gc + (tl.minimum(t0 + BT, eos) - 1) * HV + i_hv)
        b_kd = (b_k.to(tl.float32) * tl.exp(b_glast - b_gc)[:, None]).to(b_v.dtype)
        b_h = b_h * tl.exp(b_glast) + tl.dot(tl.trans(b_kd), b_v)
    if STORE_FINAL:
        tl.store(ht + row.to(tl.int64) * N * P + p_np, b_h, mask=m_np)


@triton.jit
def _output_fwd_kernel(q, k, v, vs, dsk, gc, h, o, scale, cu_seqlens, chunk_indices, T, NT_SEQ,
                       G: tl.constexpr, HV: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
                       BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, RB: tl.constexpr,
                       HAS_VS: tl.constexpr, HAS_D: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program per (P block, block of RB value heads of one group, chunk): q, k and q k^T
    # are the group's, loaded and multiplied once for the RB heads (at the Mamba2 1.3B shape
    # all 64 heads share one group). One grid axis, in the order (chunk, head block, P block)
    # with the P blocks innermost: the chunks are not an axis of their own, whose limit of
    # 65535 would cap a call at 4M tokens
    NP: tl.constexpr = (P + BP - 1) // BP
    NRB: tl.constexpr = HV // G // RB
    pid = tl.program_id(0)
    i_p = pid % NP
    i_blk = (pid // NP) % (G * NRB)
    i_c = pid // (NP * G * NRB)
    i_g = i_blk // NRB
    i_n, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = (t0 + o_i).to(tl.int64)
    m_t = o_t < eos
    o_n = tl.arange(0, BN)
    o_p = i_p * BP + tl.arange(0, BP)
    m_tn = m_t[:, None] & (o_n < N)[None, :]
    m_tp = m_t[:, None] & (o_p < P)[None, :]
    b_q = tl.load(q + (o_t * G + i_g)[:, None] * N + o_n[None, :], mask=m_tn, other=0.)
    b_k = tl.load(k + (o_t * G + i_g)[:, None] * N + o_n[None, :], mask=m_tn, other=0.)
    b_qk = tl.dot(b_q, tl.trans(b_k))
    m_s = o_i[:, None] >= o_i[None, :]
    for i_r in range(0, RB):
        i_hv = i_blk * RB + i_r
        b_v = _load_v(v, vs, o_t, i_hv, o_p, m_tp, m_t, HV, P, HAS_VS)
        b_gc = tl.load(gc + o_t * HV + i_hv, mask=m_t, other=0.)
        b_h = tl.load(h + (i_c * HV + i_hv).to(tl.int64) * N * P + o_n[:, None] * P + o_p[None, :],
                      mask=(o_n < N)[:, None] & (o_p < P)[None, :], other=0.)
        # (q e^gc) h = e^gc (q h): the row scale after the dot, in fp32
        b_o = tl.exp(b_gc)[:, None] * tl.dot(b_q, b_h.to(b_q.dtype))
        b_s = b_qk * tl.exp(tl.where(m_s, b_gc[:, None] - b_gc[None, :], float("-inf")))
        b_o += tl.dot(b_s.to(b_v.dtype), b_v)
        b_o = b_o * scale
        if HAS_D:
            # the skip term D * v of the unscaled v (Mamba2's D x), v again from L1 / L2
            b_x = tl.load(v + (o_t * HV + i_hv)[:, None] * P + o_p[None, :], mask=m_tp, other=0.)
            b_d = tl.load(dsk + i_hv * P + o_p, mask=o_p < P, other=0.)
            b_o += b_x.to(tl.float32) * b_d[None, :]
        tl.store(o + (o_t * HV + i_hv)[:, None] * P + o_p[None, :],
                 b_o.to(o.dtype.element_ty), mask=m_tp)


@triton.jit
def _state_bwd_kernel(q, do, gc, dh, dht, dh0, scale, cu_seqlens, chunk_offsets, T, NT_SEQ,
                      G: tl.constexpr, HV: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
                      BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                      USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_np, i_hv, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_p, i_nb = i_np % tl.cdiv(P, BP), i_np // tl.cdiv(P, BP)
    i_g = i_hv // (HV // G)
    bos, eos, nt, c_off = sequence_bounds(i_n, cu_seqlens, chunk_offsets, T, NT_SEQ, BT, IS_VARLEN)
    o_n = i_nb * BN + tl.arange(0, BN)
    o_p = i_p * BP + tl.arange(0, BP)
    m_np = (o_n < N)[:, None] & (o_p < P)[None, :]
    p_np = o_n[:, None] * P + o_p[None, :]
    row = i_n * HV + i_hv
    b_dh = tl.zeros([BN, BP], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + row.to(tl.int64) * N * P + p_np, mask=m_np, other=0.)
    for i_r in range(0, nt):
        i_t = nt - 1 - i_r
        t0 = bos + i_t * BT
        tl.store(dh + ((c_off + i_t) * HV + i_hv).to(tl.int64) * N * P + p_np,
                 b_dh.to(dh.dtype.element_ty), mask=m_np)
        o_t = (t0 + tl.arange(0, BT)).to(tl.int64)
        m_t = o_t < eos
        b_q = tl.load(q + (o_t * G + i_g)[:, None] * N + o_n[None, :],
                      mask=m_t[:, None] & (o_n < N)[None, :], other=0.)
        b_do = tl.load(do + (o_t * HV + i_hv)[:, None] * P + o_p[None, :],
                       mask=m_t[:, None] & (o_p < P)[None, :], other=0.)
        b_gc = tl.load(gc + o_t * HV + i_hv, mask=m_t, other=0.)
        b_glast = tl.load(gc + (tl.minimum(t0 + BT, eos) - 1) * HV + i_hv)
        b_qd = (b_q.to(tl.float32) * (scale * tl.exp(b_gc))[:, None]).to(b_do.dtype)
        b_dh = b_dh * tl.exp(b_glast) + tl.dot(tl.trans(b_qd), b_do)
    if STORE_DH0:
        tl.store(dh0 + row.to(tl.int64) * N * P + p_np, b_dh, mask=m_np)


@triton.jit
def _chunk_bwd_kernel(q, k, v, vs, dsk, gc, h, dh, do, dq, dk, dv, dg, dvs, ddsk, scale,
                      cu_seqlens, chunk_indices, T, NT_SEQ,
                      G: tl.constexpr, HV: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
                      BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, RB: tl.constexpr,
                      HAS_VS: tl.constexpr, HAS_D: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program per (block of RB value heads of one group, chunk): q, k and q k^T are the
    # group's, loaded and multiplied once. dq and dk are sums over the heads, and in each
    # head's part only the decayed pair weights dP differ (k and q are the group's):
    #     dq = (sum_h dP_h) k + sum_h (scale e^gc_h do_h) h_h^T
    #     dk = (sum_h dP_h)^T q + sum_h (e^(gc_last - gc_h) v_h) dh_h^T
    # so the head loop adds dP_h into one [64, 64] fp32 tile and the state parts into the dq /
    # dk accumulators of its dots; the two pair products with k and q run once per program,
    # after the loop. The dg terms that read a head's own dq / dk (q . dq^S, k . dk^S) come
    # from the [64, P] products q h and k dh instead. dq, dk are stored once per block
    # ([.., G * R / RB, N] fp32), so the partial sums the launcher adds up shrink RB-fold (at
    # the Mamba2 1.3B shape, 64 heads of one group: a [T, 64, 128] fp32 pair of 0.5 GB each at
    # 16K tokens with one head per program)
    # one grid axis, (chunk, head block) with the head blocks innermost (no chunk axis of its
    # own: see _output_fwd_kernel)
    NRB: tl.constexpr = HV // G // RB
    pid = tl.program_id(0)
    i_blk, i_c = pid % (G * NRB), pid // (G * NRB)
    i_g = i_blk // NRB
    i_n, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = (t0 + o_i).to(tl.int64)
    m_t = o_t < eos
    o_n = tl.arange(0, BN)
    o_p = tl.arange(0, BP)
    m_tn = m_t[:, None] & (o_n < N)[None, :]
    m_tp = m_t[:, None] & (o_p < P)[None, :]
    m_np = (o_n < N)[:, None] & (o_p < P)[None, :]
    p_qk = (o_t * G + i_g)[:, None] * N + o_n[None, :]
    b_q = tl.load(q + p_qk, mask=m_tn, other=0.)
    b_k = tl.load(k + p_qk, mask=m_tn, other=0.)
    b_qk = tl.dot(b_q, tl.trans(b_k))
    i_last = tl.minimum(t0 + BT, eos) - 1 - t0
    m_s = o_i[:, None] >= o_i[None, :]
    # the diagonal i = j is left out of dg explicitly (below)
    m_strict = o_i[:, None] > o_i[None, :]
    b_m = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BN], dtype=tl.float32)
    b_dk = tl.zeros([BT, BN], dtype=tl.float32)
    for i_r in range(0, RB):
        i_hv = i_blk * RB + i_r
        p_vo = (o_t * HV + i_hv)[:, None] * P + o_p[None, :]
        p_np = (i_c * HV + i_hv).to(tl.int64) * N * P + o_n[:, None] * P + o_p[None, :]
        b_v = _load_v(v, vs, o_t, i_hv, o_p, m_tp, m_t, HV, P, HAS_VS)
        b_do = tl.load(do + p_vo, mask=m_tp, other=0.)
        b_gc = tl.load(gc + o_t * HV + i_hv, mask=m_t, other=0.)
        b_glast = tl.load(gc + (t0 + i_last) * HV + i_hv)
        b_h = tl.load(h + p_np, mask=m_np, other=0.)
        b_dh = tl.load(dh + p_np, mask=m_np, other=0.)
        # the parts through the states first, while h and dh are fresh:
        # dk += (e^(gc_last - gc) v) dh^T; k dh once for dv's state part and
        # k_j . dk^S_j = sum_p v_jp (e^(gc_last - gc_j) k dh)_jp
        b_e_last = tl.where(m_t, tl.exp(b_glast - b_gc), 0.)
        b_dk = tl.dot((b_v.to(tl.float32) * b_e_last[:, None]).to(b_v.dtype),
                      tl.trans(b_dh.to(b_v.dtype)), b_dk)
        b_kdh = b_e_last[:, None] * tl.dot(b_k, b_dh.to(b_k.dtype))
        b_ks = tl.where(m_t, tl.sum(b_v.to(tl.float32) * b_kdh, axis=1), 0.)
        # h, dh are stored in the inputs' dtype (the dots' operand type); <h, dh> in fp32
        b_hdh = tl.sum(tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1), axis=0)
        # dq += (scale e^gc do) h^T; q_i . dq^S_i = sum_p (scale e^gc_i do_i)_p (q h)_ip
        b_dos = b_do.to(tl.float32) * (scale * tl.exp(b_gc))[:, None]
        b_dgc = tl.sum(b_dos * tl.dot(b_q, b_h.to(b_q.dtype)), axis=1)
        b_dq = tl.dot(b_dos.to(b_do.dtype), tl.trans(b_h.to(b_do.dtype)), b_dq)

        b_dec = tl.exp(tl.where(m_s, b_gc[:, None] - b_gc[None, :], float("-inf"))) * scale
        # S_ij = scale e^(gc_i - gc_j) q_i.k_j, dP_ij = scale e^(gc_i - gc_j) do_i.v_j  (j <= i)
        b_dov = tl.dot(b_do, tl.trans(b_v))
        # dg_t = sum_{s >= t} (q_s . dq^S_s + sum_{j < s} A_sj - sum_{i > s} A_is)
        #        + exp(gc_last) <h, dh> + sum_{j < t} k_j . dk^S_j
        # with A_ij = scale e^(gc_i - gc_j) (q_i . k_j)(do_i . v_j), j < i. The diagonal i = j
        # is left out: its q_i . dq_i and k_i . dk_i parts cancel exactly, and under strong
        # decay (where it dominates) their fp32 difference would swamp the true gradient.
        # Each term is reduced as soon as its tile exists (fewer tiles live at once).
        b_a = tl.where(m_strict, b_qk * b_dov * b_dec, 0.)
        b_dgc += tl.sum(b_a, axis=1) - tl.sum(b_a, axis=0)
        b_m += b_dov * b_dec
        b_s = (b_qk * b_dec).to(b_do.dtype)
        b_dv = tl.dot(tl.trans(b_s), b_do) + b_kdh
        if HAS_VS or HAS_D:
            # the unscaled v again (from L1 / L2, not kept live)
            b_vraw = tl.load(v + p_vo, mask=m_tp, other=0.).to(tl.float32)
        if HAS_VS:
            # v read as v * vs: dvs = sum_p v dv_eff, dv = vs dv_eff
            tl.store(dvs + o_t * HV + i_hv, tl.sum(b_vraw * b_dv, axis=1), mask=m_t)
            b_dv = b_dv * tl.load(vs + o_t * HV + i_hv, mask=m_t, other=0.)[:, None]
        if HAS_D:
            # o += D * v: dv += D do; this chunk's part of dD = sum_t do v (summed by the launcher)
            b_dof = b_do.to(tl.float32)
            b_dv += b_dof * tl.load(dsk + i_hv * P + o_p, mask=o_p < P, other=0.)[None, :]
            tl.store(ddsk + (i_c * HV + i_hv).to(tl.int64) * P + o_p, tl.sum(b_dof * b_vraw, axis=0),
                     mask=o_p < P)
        tl.store(dv + p_vo, b_dv.to(dv.dtype.element_ty), mask=m_tp)
        b_dgc = tl.where(m_t, b_dgc, 0.)
        b_dg = tl.cumsum(b_dgc, axis=0, reverse=True) + (tl.cumsum(b_ks, axis=0) - b_ks) \
            + tl.exp(b_glast) * b_hdh
        tl.store(dg + o_t * HV + i_hv, b_dg, mask=m_t)

    b_mq = b_m.to(b_q.dtype)
    b_dq = tl.dot(b_mq, b_k, b_dq)
    b_dk = tl.dot(tl.trans(b_mq), b_q, b_dk)
    p_hk = (o_t * (HV // RB) + i_blk)[:, None] * N + o_n[None, :]
    tl.store(dq + p_hk, b_dq, mask=m_tn)
    tl.store(dk + p_hk, b_dk, mask=m_tn)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _block_p(P: int) -> int:
    return min(64, _pow2(P))


# the sequential state passes run one program per (state tile, value head, sequence): with
# whole [N, P] tiles, one sequence of the Mamba2 1.3B shape (64 heads) gave 64 programs for 132
# SMs, each stepping through every chunk alone. The update is separable over the state's rows
# and columns (S <- e^g S + k^T v, row n reads only k[:, n]), so the tile shrinks until there
# are enough programs, down to 32 x 32
_STATE_PROGRAMS = 512


def _state_blocks(N: int, P: int, HV: int, NS: int) -> Tuple[int, int]:
    BN, BP = _pow2(N), _block_p(P)
    while (triton.cdiv(N, BN) * triton.cdiv(P, BP) * HV * NS < _STATE_PROGRAMS
           and max(BN, BP) > 32):
        if BN >= BP:
            BN //= 2
        else:
            BP //= 2
    return BN, BP


# Value heads per program of the output launch and of the chunk backward (at most). In the
# output launch the block's heads share one q k^T (a [64, N] x [N, 64] product per head and
# chunk before; offline 156 -> 192 registers at 4 warps, no spills). In the chunk backward,
# with one head per program every head writes its own fp32 dq / dk partials: at the Mamba2
# 1.3B shape (64 heads of one group, N = 128) 2 x 0.5 GB per 16K tokens, written, then read
# back by the group sum, ~2.1 GB of the backward's traffic (~0.7 ms on an H100) against
# ~1.9 GB for everything else the chunk backward reads and writes.
# Eight cut the partials to an eighth; the head loop carries the summed pair weights and the
# dq / dk accumulators of its dots, and the pair products with k and q run once per program.
# Offline (sm_90a, Triton 3.6, 8 warps, the 1.3B shape; benchmarks/regs_ssd.py): spills 432 B
# per thread at eight heads (the loop before this form: 952 B), 208 B at one (72 B). Eight by
# default from that arithmetic, not yet timed on a GPU; `bench_ssd.py --heads-per-program 1`
# times one head per program beside it.
DEFAULT_HEADS_PER_PROGRAM = int(os.environ.get("MEGATRON_GDN_SSD_HEADS_PER_PROGRAM", "8"))
MAX_HEADS_PER_PROGRAM = DEFAULT_HEADS_PER_PROGRAM


# software-pipelining stages of the chunk backward's head loop (the next head's v, do, h, dh
# loaded during this one's dots). Triton's default 3 (the launch until now); offline (sm_90a,
# bf16, eight heads, x * dt in) spills 776 B per thread and 150 KB of shared memory at 3, 580 B
# and 90 KB at 1 (one 8-warp program per SM either way: 255 registers). Which is faster is for
# a GPU to say: `bench_ssd.py --ab-bwd-stages` times 1 beside it
DEFAULT_CHUNK_BWD_STAGES = 3
CHUNK_BWD_STAGES = DEFAULT_CHUNK_BWD_STAGES


def _heads_per_program(R: int) -> int:
    """Value heads per program of the chunk backward: the largest of 8, 4, 2, 1 that divides
    the R = HV // G heads of a group and is at most MAX_HEADS_PER_PROGRAM."""
    return next(rb for rb in (8, 4, 2, 1) if R % rb == 0 and rb <= max(1, MAX_HEADS_PER_PROGRAM))


def _state_dtype(N: int, P: int, dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-chunk states h and their gradients dh: the inputs' (the dots read them
    in it; fp32 inputs keep fp32), so half the bytes in bf16, written and read twice over;
    fp32 for N x P above 256 x 64, where the chunk backward's dot operands of bf16 [N, P]
    tiles need 270 KB of shared memory at 256 x 128 (Hopper has 227 KB; 224 KB with fp32
    tiles converted at each use). <h, dh> is formed in fp32 either way."""
    return dtype if _pow2(N) * _pow2(P) <= 256 * 64 else torch.float32


def launch_configs(G: int, HV: int, N: int, P: int, B: int, T: int):
    """(kernel name, constexprs, num_warps) of every launch at this shape (dense rows of T
    tokens), as the launchers below configure them: for benchmarks/regs_ssd.py."""
    BN, BP = _state_blocks(N, P, HV, B)
    state = dict(G=G, HV=HV, N=N, P=P, BT=BT, BN=BN, BP=BP, IS_VARLEN=False)
    # HAS_VS, HAS_D: v read as x * dt and the skip D x added, as the Mamba2 mixer calls the kernel
    return [
        ("_state_fwd_kernel", dict(state, USE_H0=False, STORE_FINAL=False, HAS_VS=True), 4),
        ("_output_fwd_kernel", dict(G=G, HV=HV, N=N, P=P, BT=BT, BN=_pow2(N), BP=_block_p(P),
                                    RB=_heads_per_program(HV // G), HAS_VS=True, HAS_D=True,
                                    IS_VARLEN=False), 4),
        ("_state_bwd_kernel", dict(state, USE_DHT=False, STORE_DH0=False), 4),
        ("_chunk_bwd_kernel", dict(G=G, HV=HV, N=N, P=P, BT=BT, BN=_pow2(N), BP=_pow2(P),
                                   RB=_heads_per_program(HV // G), HAS_VS=True, HAS_D=True,
                                   IS_VARLEN=False), 8),
    ]


def ssd_cumsum(g, layout):
    B, T, HV = g.shape
    gc = torch.empty(B, T, HV, dtype=torch.float32, device=g.device)
    BH = min(64, triton.next_power_of_2(HV))
    cu, idx, _, T_, nts, varlen = layout.kernel_args()
    _cumsum_kernel[(layout.num_chunks, triton.cdiv(HV, BH))](
        g, gc, cu, idx, T_, nts, HV=HV, BT=BT, BH=BH, IS_VARLEN=varlen)
    return gc


def ssd_state_buffer(k, v, layout):
    """An empty h [NTC, HV, N, P] for ssd_state_fwd (dtype `_state_dtype`)."""
    N, HV, P = k.shape[3], v.shape[2], v.shape[3]
    return torch.empty(layout.num_chunks, HV, N, P, dtype=_state_dtype(N, P, k.dtype),
                       device=k.device)


def ssd_state_fwd(k, v, gc, layout, initial_state, output_final_state, h=None, vs=None):
    """Returns h [NTC, HV, N, P] (state entering every chunk; `_state_dtype`; written into h
    where given, from ssd_state_buffer) and the final state (fp32) or None. vs: None or
    [B, T, HV] fp32, v read as v * vs (every launch below takes it so)."""
    B, T, G, N = k.shape
    HV, P = v.shape[2], v.shape[3]
    NS = layout.num_seqs
    h = ssd_state_buffer(k, v, layout) if h is None else h
    ht = torch.empty(NS, HV, N, P, dtype=torch.float32, device=k.device) if output_final_state else None
    BN, BP = _state_blocks(N, P, HV, NS)
    cu, _, offs, T_, nts, varlen = layout.kernel_args()
    _state_fwd_kernel[(triton.cdiv(N, BN) * triton.cdiv(P, BP), HV, NS)](
        k, v, vs, gc, h, initial_state, ht, cu, offs, T_, nts,
        G=G, HV=HV, N=N, P=P, BT=BT, BN=BN, BP=BP,
        USE_H0=initial_state is not None, STORE_FINAL=output_final_state, HAS_VS=vs is not None,
        IS_VARLEN=varlen, num_warps=4)
    return h, ht


def ssd_output_fwd(q, k, v, gc, h, scale, layout, vs=None, dsk=None):
    """o [B, T, HV, P] (v's dtype); with dsk ([HV, P] fp32) plus dsk * v (the unscaled v)."""
    B, T, G, N = q.shape
    HV, P = v.shape[2], v.shape[3]
    o = torch.empty_like(v)
    # value-column blocks of 64 (one at the Mamba2 shapes); 16 under the interpreter, so that
    # the tests cross them
    BP = min(16, _block_p(P)) if INTERPRET else _block_p(P)
    cu, idx, _, T_, nts, varlen = layout.kernel_args()
    RB = _heads_per_program(HV // G)
    _output_fwd_kernel[(triton.cdiv(P, BP) * (HV // RB) * layout.num_chunks,)](
        q, k, v, vs, dsk, gc, h, o, scale, cu, idx, T_, nts,
        G=G, HV=HV, N=N, P=P, BT=BT, BN=_pow2(N), BP=BP, RB=RB, HAS_VS=vs is not None,
        HAS_D=dsk is not None, IS_VARLEN=varlen, num_warps=4)
    return o


def ssd_bwd(q, k, v, gc, scale, initial_state, do, dht, layout, vs=None, dsk=None):
    """Returns dq, dk [B, T, G, N] (q's dtype), dv (v's dtype), dg [B, T, HV] fp32, dh0 or None,
    with vs (v read as v * vs) dvs [B, T, HV] fp32 (else None), and with dsk (o += dsk * v,
    [HV, P] fp32) its gradient [HV, P] fp32 (else None); dv is v's whole gradient.

    Where the chunk backward's tiles do not fit the GPU's shared memory (fp32 inputs from
    N x P = 128 x 64 on: 256 KB of dot operands on Hopper's 227 KB), the value columns are
    split in halves until they do (`ssd_bwd_columns`)."""
    # shapes whose launch did not fit: split at once next time (the failed attempt recomputes
    # the states before the chunk backward's launch raises)
    key = (q.shape[-1], v.shape[-1], q.dtype, q.device)
    if key not in _TOO_WIDE:
        try:
            return _ssd_bwd(q, k, v, gc, scale, initial_state, do, dht, layout, vs, dsk)
        except triton.runtime.errors.OutOfResources:
            if v.shape[-1] <= 16:
                raise
            _TOO_WIDE.add(key)
    return ssd_bwd_columns(q, k, v, gc, scale, initial_state, do, dht, layout, parts=2, vs=vs, dsk=dsk)


_TOO_WIDE: set = set()


def ssd_bwd_columns(q, k, v, gc, scale, initial_state, do, dht, layout, parts: int, vs=None,
                    dsk=None):
    """ssd_bwd over `parts` blocks of the P value columns, one after another. The scalar-decay
    recurrence is separable over the state's columns (column p of S, o and h reads only
    column p of v): dv, dh0 and dsk's gradient are the blocks' side by side, and dq, dk, dg,
    dvs the sums of the blocks' (each is a sum over the columns)."""
    P = v.shape[-1]
    if P % parts or (P // parts) % 8:
        raise ValueError(f"cannot split P={P} value columns into {parts} blocks of a multiple of 8")
    width = P // parts
    outs = []
    for p0 in range(0, P, width):
        part = lambda x: None if x is None else x[..., p0:p0 + width].contiguous()  # noqa: E731
        outs.append(ssd_bwd(q, k, part(v), gc, scale, part(initial_state), part(do), part(dht), layout, vs,
                            part(dsk)))
    dq = sum(o[0].float() for o in outs).to(q.dtype)
    dk = sum(o[1].float() for o in outs).to(k.dtype)
    dv = torch.cat([o[2] for o in outs], dim=-1)
    dg = sum(o[3] for o in outs)
    dh0 = None if initial_state is None else torch.cat([o[4] for o in outs], dim=-1)
    dvs = None if vs is None else sum(o[5] for o in outs)
    ddsk = None if dsk is None else torch.cat([o[6] for o in outs], dim=-1)
    return dq, dk, dv, dg, dh0, dvs, ddsk


def _ssd_bwd(q, k, v, gc, scale, initial_state, do, dht, layout, vs=None, dsk=None):
    h, dh, dh0 = ssd_state_and_dh(q, k, v, gc, scale, initial_state, do, dht, layout, vs=vs)
    dq_h, dk_h, dv, dg, dvs, ddsk = ssd_chunk_bwd(q, k, v, gc, h, dh, do, scale, layout, vs, dsk)
    dq, dk = ssd_group_sums(dq_h, dk_h, q.shape[2], q.dtype, k.dtype)
    return dq, dk, dv, dg, dh0, dvs, None if ddsk is None else ddsk.sum(0)


# the backward's launches one by one (benchmarks/profile_ssd.py times each): the states again
# (ssd_state_fwd), the reverse pass, the chunk-local gradients, the sums over a group's heads

def ssd_state_bwd(q, do, gc, h, dht, want_dh0: bool, scale, layout):
    """The reverse pass: dh [NTC, HV, N, P] (h's dtype), the gradient of the state entering
    every chunk, and dh0 [NS, HV, N, P] fp32 (or None unless want_dh0)."""
    B, T, G, N = q.shape
    HV, P = do.shape[2], do.shape[3]
    NS = layout.num_seqs
    dh = torch.empty_like(h)
    dh0 = torch.empty(NS, HV, N, P, dtype=torch.float32, device=q.device) if want_dh0 else None
    BN, BP = _state_blocks(N, P, HV, NS)
    cu, idx, offs, T_, nts, varlen = layout.kernel_args()
    _state_bwd_kernel[(triton.cdiv(N, BN) * triton.cdiv(P, BP), HV, NS)](
        q, do, gc, dh, dht, dh0, scale, cu, offs, T_, nts,
        G=G, HV=HV, N=N, P=P, BT=BT, BN=BN, BP=BP,
        USE_DHT=dht is not None, STORE_DH0=want_dh0, IS_VARLEN=varlen, num_warps=4)
    return dh, dh0


def ssd_state_and_dh(q, k, v, gc, scale, initial_state, do, dht, layout,
                     overlap: Optional[bool] = None, vs=None):
    """The backward's states again (ssd_state_fwd) and its reverse pass (ssd_state_bwd): h, dh,
    dh0. They read nothing of each other's: on a GPU the first runs on a side stream beside
    the second (overlap; None: OVERLAP_STREAMS), else one after the other."""
    h = ssd_state_buffer(k, v, layout)
    grads = []
    beside(q.device, OVERLAP_STREAMS if overlap is None else overlap,
           lambda: grads.extend(ssd_state_bwd(q, do, gc, h, dht, initial_state is not None,
                                              scale, layout)),
           lambda: ssd_state_fwd(k, v, gc, layout, initial_state, False, h=h, vs=vs),
           (h,))
    dh, dh0 = grads
    return h, dh, dh0


def ssd_chunk_bwd(q, k, v, gc, h, dh, do, scale, layout, vs=None, dsk=None):
    """The chunk-local gradients: dq, dk per block of RB value heads ([B, T, HV // RB, N]
    fp32, for ssd_group_sums), dv (v's dtype), dg [B, T, HV] fp32, dvs [B, T, HV] fp32 with
    vs (else None) and dsk's gradient per chunk [NTC, HV, P] fp32 with dsk (else None)."""
    B, T, G, N = q.shape
    HV, P = v.shape[2], v.shape[3]
    cu, idx, _, T_, nts, varlen = layout.kernel_args()
    RB = _heads_per_program(HV // G)
    dq_h = torch.empty(B, T, HV // RB, N, dtype=torch.float32, device=q.device)
    dk_h = torch.empty_like(dq_h)
    dv = torch.empty_like(v)
    dg = torch.empty(B, T, HV, dtype=torch.float32, device=q.device)
    dvs = None if vs is None else torch.empty_like(dg)
    ddsk = None if dsk is None else torch.empty(layout.num_chunks, HV, P, dtype=torch.float32, device=q.device)
    _chunk_bwd_kernel[(HV // RB * layout.num_chunks,)](
        q, k, v, vs, dsk, gc, h, dh, do, dq_h, dk_h, dv, dg, dvs, ddsk, scale, cu, idx, T_, nts,
        G=G, HV=HV, N=N, P=P, BT=BT, BN=_pow2(N), BP=_pow2(P), RB=RB, HAS_VS=vs is not None,
        HAS_D=dsk is not None, IS_VARLEN=varlen, num_warps=8, num_stages=CHUNK_BWD_STAGES)
    return dq_h, dk_h, dv, dg, dvs, ddsk


def ssd_group_sums(dq_h, dk_h, G: int, q_dtype, k_dtype):
    """q / k of a group are read by its value heads: the per-block contributions
    [B, T, HV // RB, N] (a group's blocks adjacent) summed to [B, T, G, N] in q's / k's dtype."""
    B, T, NB, N = dq_h.shape
    dq = dq_h.view(B, T, G, NB // G, N).sum(3).to(q_dtype)
    dk = dk_h.view(B, T, G, NB // G, N).sum(3).to(k_dtype)
    return dq, dk


class ChunkScalarDecayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state, cu_seqlens, v_scale, d_skip):
        B, T = q.shape[:2]
        layout = make_chunk_layout(cu_seqlens, B, T)
        gc = ssd_cumsum(g, layout)
        h, final_state = ssd_state_fwd(k, v, gc, layout, initial_state, output_final_state, vs=v_scale)
        o = ssd_output_fwd(q, k, v, gc, h, scale, layout, vs=v_scale, dsk=d_skip)
        ctx.save_for_backward(q, k, v, gc, initial_state, v_scale, d_skip)
        ctx.layout = layout
        ctx.scale = scale
        ctx.g_dtype = g.dtype
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, initial_state, v_scale, d_skip = ctx.saved_tensors
        if dht is not None:
            dht = dht.float().contiguous()
        dq, dk, dv, dg, dh0, dvs, dd = ssd_bwd(q, k, v, gc, ctx.scale, initial_state, do.contiguous(), dht,
                                               ctx.layout, v_scale, d_skip)
        return (
            dq, dk, dv, dg.to(ctx.g_dtype), dh0,
            None,  # scale
            None,  # output_final_state
            None,  # cu_seqlens
            dvs,  # v_scale (fp32 here: the entry point casts it)
            dd,  # d_skip ([HV, P] fp32 here: the entry point expands it)
        )


def chunk_scalar_decay_triton(
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
    """Triton chunked scalar-decay linear attention (arguments already validated by api.py).

    Args:
        q, k: [B, T, G, N]; v: [B, T, HV, P]; g: [B, T, HV]; initial_state: [NS, HV, N, P]
        float32 or None; cu_seqlens: [NS + 1] with B == 1; v_scale: [B, T, HV] or None (v
        read as v * v_scale in fp32, rounded to v's dtype); d_skip: [HV] or [HV, P] or None
        (o += d_skip * v, the unscaled v, before o is rounded).
    Returns:
        o: [B, T, HV, P] in v's dtype; final_state: [NS, HV, N, P] float32 or None.
    """
    if scale is None:
        scale = 1.0
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    if v_scale is not None:
        v_scale = v_scale.float().contiguous()
    if d_skip is not None:
        HV, P = v.shape[2], v.shape[3]
        d_skip = d_skip.float().reshape(HV, -1).expand(HV, P).contiguous()
    return ChunkScalarDecayFunction.apply(q, k, v, g, initial_state, float(scale), output_final_state,
                                          cu_seqlens, v_scale, d_skip)
