"""Backward of the chunked gated delta rule (chunk C = 64), six launches.

Legend: B batch, T tokens per batch row, H key heads, HV value heads, G = HV // H, K key dim,
V value dim, N sequences, NT chunks over all sequences; rows i, j index tokens of one chunk.

Forward of one chunk (value head hv, key head hv // G), gc = chunk-local cumsum of g,
gl = gc of the chunk's last token, h = state entering the chunk, h' = state leaving it:

    A[i, j] = beta_i (k_i . k_j) e^(gc_i - gc_j)  (j < i),   Tm = (I + A)^-1
    w = Tm kb,  kb = beta e^gc k;     u = Tm vb,  vb = beta v
    v_new = u - w h
    o  = s ((q e^gc) h + P v_new),     P[i, j] = e^(gc_i - gc_j) (q_i . k_j)  (j <= i), s = scale
    h' = e^gl h + (k e^(gl - gc))^T v_new

Gradients, with dh' the gradient arriving at h' (the final-state gradient for the last chunk):

    dv_new = s P^T do + (k e^(gl - gc)) dh'                                   ("dv2")
    dh     = e^gl dh' + s (q e^gc)^T do - w^T dv_new                   (reverse over chunks)
    dq     = s e^gc (do h^T) + Ds k,        Ds[i, j] = s e^(gc_i - gc_j) (do_i . v_new_j) (j <= i)
    dk     = e^(gl - gc) (v_new dh'^T) + Ds^T q + beta e^gc dkb + bE k + bE^T k
  WY part: dw = -dv_new h^T, du = dv_new. With dvb = Tm^T dv_new and the identity
  Tm (vb - kb h) = v_new, the gradient of Tm collapses to
    dkb = Tm^T dw = -dvb h^T,     dA = -Tm^T (dw kb^T + du vb^T) Tm^T = -dvb v_new^T,
  so nothing of size C x C beyond Tm itself is needed.  With E = dA * e^(gc_i - gc_j) (j < i)
  and bE = beta_i E:
    dv    = beta dvb
    dbeta = rowsum(v * dvb) + e^gc rowsum(k * dkb) + rowsum(E * (k k^T))
  dg, without subtracting prefix sums: g enters through seg[i, j] = sum_{j < r <= i} g_r
  (the pair exponents gc_i - gc_j, j < i), through gc_i (the e^gc factors) and through
  sfx_j = gl - gc_j = sum_{r > j} g_r. With their gradients
    X[i, j] = (s Ds_raw e^seg * q k^T)[i, j] + (bE * k k^T)[i, j]   (j < i, Ds_raw = do v_new^T)
    a_i     = q_i . (s e^gc_i do_i h^T) + beta_i e^gc_i (k_i . dkb_i) + [i = last] e^gl sum(h * dh')
    b_j     = k_j . dk_h_j,   dk_h = e^sfx (v_new dh'^T)
  and sfx_j = seg[63, j] (rows past a partial chunk's end hold g = 0), b goes into row 63 of
  X, and dg_r = sum_{i >= r} a_i + sum_{i >= r, j < r} X[i, j]: a reverse cumsum of a and of
  X's columns, each term added once. Differences gc_i - gc_j of two prefix sums, or
  "total - cumsum + x", leave rounding residues of ulp(|gc|) (1e-4 at g = -22, gc = -1400)
  that are as large as the true dg there; so seg and sfx are formed from g itself (the
  optional `g` argument; without it g is recovered as differences of gc). The pair
  decay on the diagonal (e^0) and of the last row (sfx = 0) carry no g at all.
  The fused l2-norm: dx = rstd (dxn - xn (xn . dxn)). GVA: dq, dk of the G value heads of a key
  head are computed per value head into [B, T, HV, K] buffers and summed afterwards (default;
  group_sum, one launch for both), or summed inside one program per key head
  (split_group=False); no repeated q / k either way.

Launches: (1) prep, per (chunk, key head) or (chunk, value head) (autotuned): Tm (stored in
v's dtype), w, u, dv_local = s P^T do;
(2) the forward state pass of chunk_fwd.py (h per chunk, v_new; skipped, and no u stored in
(1), when the forward kept them: `states`); (3) qdo, per (chunk, value
head, V block): s (q e^gc)^T do into the dh buffer and the key decay e^(gl - gc) of each token
(the key decay alone, per (chunk, value head), under QDO_INLINE);
(4) the reverse state pass, per (sequence, value head, V block): dh' per chunk (reading (3)
back first, or forming s (q e^gc)^T do itself under QDO_INLINE), dv_new in place of dv_local,
dh0;
(5) grads, per (chunk, value head) or (chunk, key head), two launches: (5a) vq: dvb =
  Tm^T dv_new, dv, Ds_raw, dA and dq, storing Ds and bE + bE^T ([B, T, HV, 64] each, q's
  dtype) and writing dg, dbeta of those terms; (5b) k: dk, with dkb = -Tm^T (dv_new h^T) (dvb
  itself is not needed), adding the rest of dg, dbeta. Each keeps at most three fp32 tiles
  live through its V loop (one launch for all of it kept five and spilled on sm_90; on H200
  the two took the same time as that one at S1 / S2 and 5% less at S3, so it was removed).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils.triton_helpers import chunk_bounds, sequence_bounds
from ..utils.tuning import AUTOTUNE, INTERPRET, autotune_or_fixed, by_parallelism, distinct
from .chunk_fwd import ChunkLayout, _launch_state, _parallelism_class, _unit_lower_inverse

__all__ = ["chunk_gated_delta_rule_bwd"]


@triton.jit
def _chunk_g(g, gc, p_t, m_t, stride, HAS_G: tl.constexpr):
    """Per-token log decay of one chunk's rows (0 on masked rows). Without the exact g it is
    recovered from gc as differences, which carry the rounding of the forward's cumsum."""
    if HAS_G:
        b_g = tl.load(g + p_t, mask=m_t, other=0.0)
    else:
        first = (tl.arange(0, 64) == 0)
        b_g = (tl.load(gc + p_t, mask=m_t, other=0.0)
               - tl.load(gc + p_t - stride, mask=m_t & (~first), other=0.0))
    return b_g


@triton.jit
def _segsum(b_g):
    """seg[i, j] = sum_{j < r <= i} g_r (0 for j >= i), [64, 64]: the exponent of the pair
    decay e^(gc_i - gc_j) as a masked cumsum. The difference gc_i - gc_j of two chunk prefix
    sums has the absolute rounding error of gc (~ulp(1400) = 1e-4 at g = -22), i.e. a
    relative error of e^(gc_i - gc_j) far above fp32 in exactly the terms that carry dg."""
    r = tl.arange(0, 64)
    return tl.cumsum(tl.where(r[:, None] > r[None, :], b_g[:, None], 0.0), 0)


@triton.jit
def _suffix(b_g):
    """gl - gc_j = sum_{r > j} g_r ([64]; 0 for the last row), summed, not subtracted."""
    r = tl.arange(0, 64)
    return tl.sum(tl.where(r[:, None] > r[None, :], b_g[:, None], 0.0), 0)


# ---------------------------------------------------------------------------------------------
# 1. prep: Tm, w, u and the chunk-local dv = s P^T do
# ---------------------------------------------------------------------------------------------

# 4 warps at one stage: it won at every shape S1-S5 on H200 against 8 warps uncapped
# (160-170 registers: one program per SM), on H100 against 8 warps capped at 128 registers, and
# (H100, 2026-12-07, benchmarks/logs/2026-12-07-h100-s13) at S1-S3 against 4 and 8 warps at
# two stages (which prefetch its K and V loops' loads without spills, offline). Offline
# (sm_90a, bf16) 4 warps take 255 registers (two programs, 8 warps per SM).
# PER_HV: with GVA (G = HV // H > 1), one program per (chunk, key head) looping over its G value
# heads (0, the launch measured to date) or one per (chunk, value head) forming the chunk's
# q k^T (and k k^T) again (1). In run 11 (H100, S3) the gradient launches ran 0.3 ms faster one
# program per value head than per key head; the prep (496 us at S3 against fla's 338 for the
# same w, u and dv_local) is timed both ways by the autotuner. At G = 1 the two are the same
# launch: pruned to the first. H100 (2026-12-07, fifteenth session): per value head won at S3
# where the prep forms Tm itself (0.78 -> 0.69 ms; no saved Tm: context parallelism, direct
# calls), and lost where it reads the forward's Tm (the default backward: per key head picked
# in the layer, the saved-Tm prep 0.50 ms either way): there it is pruned, a second's less
# autotuning in a new shape's first call.
_BWD_PREP_CONFIGS = [triton.Config({"PER_HV": 0}, num_warps=4, num_stages=1),
                     triton.Config({"PER_HV": 1}, num_warps=4, num_stages=1)]


def _prune_bwd_prep(configs, named_args, **kwargs):
    """One program per value head only where there are several value heads per key head and
    the prep forms Tm itself (not HAS_TM)."""
    H = named_args.get("H", kwargs.get("H"))
    HV = named_args.get("HV", kwargs.get("HV"))
    has_tm = named_args.get("HAS_TM", kwargs.get("HAS_TM"))
    per_hv = HV > H and not has_tm
    kept = configs if per_hv else [c for c in configs if c.kwargs["PER_HV"] == 0] or configs[:1]
    kept = distinct(kept)  # a pin comes listed twice
    return kept if AUTOTUNE else kept[:1]


@autotune_or_fixed(
    configs=_BWD_PREP_CONFIGS,
    interpret_config=triton.Config({"PER_HV": 0}, num_warps=4, num_stages=1),
    key=["H", "HV", "K", "V", "L2", "IS_VARLEN", "HAS_TM", "STORE_U"],
    prune_configs_by={"early_config_prune": _prune_bwd_prep},
)
@triton.jit
def _bwd_prep_kernel(
    q, k, v, g, gc, beta, q_rstd, k_rstd, do, tm, w, u, dv, scale,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr, HAS_G: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_TM: tl.constexpr, STORE_U: tl.constexpr,
    PER_HV: tl.constexpr,
):
    # HAS_TM: tm already holds the forward's Tm (v's dtype): read it, no k k^T and no inverse;
    # else Tm is formed here and stored into tm for the gradient kernels. STORE_U: u = Tm vb
    # for the state pass (not when the forward kept its states). Program id 1: the key head
    # (PER_HV = 0: its NG = G value heads in turn) or the value head (PER_HV = 1: NG = 1)
    i_c, i_p = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = HV // H
    NG: tl.constexpr = G if PER_HV == 0 else 1
    i_h = (i_p * NG) // G
    _, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, 64, IS_VARLEN)
    r = tl.arange(0, 64)
    t_r = t0 + r
    m_t = t_r < eos
    k_h = k + i_h * K
    q_h = q + i_h * K
    # k k^T and k q^T of the chunk (rows: k tokens), shared by the G value heads
    b_kk = tl.zeros([64, 64], dtype=tl.float32)
    b_kq = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (cols < K)[None, :]
        b_k = tl.load(k_h + t_r[:, None] * (H * K) + cols[None, :], mask=m_tk, other=0.0)
        b_q = tl.load(q_h + t_r[:, None] * (H * K) + cols[None, :], mask=m_tk, other=0.0)
        if not HAS_TM:
            b_kk += tl.dot(b_k, tl.trans(b_k))
        b_kq += tl.dot(b_k, tl.trans(b_q))
    rk = tl.full([64], 1.0, dtype=tl.float32)
    if L2:
        rk = tl.load(k_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        rq = tl.load(q_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        b_kk = b_kk * rk[:, None] * rk[None, :]
        b_kq = b_kq * rk[:, None] * rq[None, :]
    lower = (r[:, None] > r[None, :]) & m_t[:, None]
    upper = (r[:, None] <= r[None, :]) & m_t[None, :]

    for i_g in range(0, NG):
        i_hv = i_p * NG + i_g
        b_gc = tl.load(gc + t_r * HV + i_hv, mask=m_t, other=0.0)
        b_beta = tl.load(beta + t_r * HV + i_hv, mask=m_t, other=0.0)
        # masked rows hold g = 0, so seg <= 0 wherever it is used: no overflow
        e_seg = tl.exp(_segsum(_chunk_g(g, gc, t_r * HV + i_hv, m_t, HV, HAS_G)))
        p_tm = tm + (t_r[:, None] * HV + i_hv) * 64 + r[None, :]
        if HAS_TM:
            b_tm = tl.load(p_tm, mask=m_t[:, None], other=0.0).to(k.dtype.element_ty)
        else:
            b_a = tl.where(lower, b_kk * e_seg, 0.0) * b_beta[:, None]
            # Tm = (I + A)^-1 in registers as the forward computes it, stored for the gradient
            # kernels (which read its lower triangle) in v's dtype, the dtype their dots take it
            b_tm_f = _unit_lower_inverse(b_a)
            tl.store(p_tm, b_tm_f.to(tm.dtype.element_ty), mask=m_t[:, None])
            b_tm = b_tm_f.to(k.dtype.element_ty)

        kb_scale = b_beta * tl.exp(b_gc) * rk
        for i_k in range(0, tl.cdiv(K, BK)):
            cols = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (cols < K)[None, :]
            b_k = tl.load(k_h + t_r[:, None] * (H * K) + cols[None, :], mask=m_tk, other=0.0)
            b_kb = (b_k * kb_scale[:, None]).to(b_k.dtype)
            b_w = tl.dot(b_tm, b_kb)
            tl.store(w + (t_r[:, None] * HV + i_hv) * K + cols[None, :],
                     b_w.to(w.dtype.element_ty), mask=m_tk)
        # P^T[j, i] = e^(gc_i - gc_j) (k_j . q_i) for i >= j
        b_pt = tl.where(upper, b_kq * tl.trans(e_seg), 0.0) * scale
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            p_tv = (t_r[:, None] * HV + i_hv) * V + o_v[None, :]
            if STORE_U:
                b_v = tl.load(v + p_tv, mask=m_tv, other=0.0)
                b_vb = (b_v * b_beta[:, None]).to(b_v.dtype)
                tl.store(u + p_tv, tl.dot(b_tm, b_vb).to(u.dtype.element_ty), mask=m_tv)
            b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
            b_dv = tl.dot(b_pt.to(b_do.dtype), b_do)
            tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)


# ---------------------------------------------------------------------------------------------
# 3. the reverse state pass: dh' per chunk, dv_new = dv_local + (k e^(gl - gc)) dh', dh0
# ---------------------------------------------------------------------------------------------

@triton.jit
def _bwd_qdo_kernel(
    q, gc, q_rstd, do, dh, scale, g, k_rstd, kscale,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr, HAS_G: tl.constexpr,
    IS_VARLEN: tl.constexpr, STORE_QDO: tl.constexpr,
):
    """The part of each chunk's state-gradient update that does not depend on the state
    gradient, (scale q e^gc)^T do ([K, V] per chunk and value head), written into the dh
    buffer at that chunk's slot, in parallel over chunks: the reverse pass reads it back just
    before it stores the chunk's dh there, so its sequential loop loads no q and makes one dot
    fewer. The V-block-0 programs also store the key decay of the pass, kscale = e^(gl - gc)
    (times k's rstd with the l2-norm): its suffix sum is a cross-warp reduction that the
    sequential loop would otherwise wait on at every chunk.

    Program id 0 runs over (chunk, V block) with the V blocks of a chunk adjacent: they read
    the same [64, K] q tile, which then comes from L2 rather than DRAM (with the chunks
    outermost instead, at S4 every q tile was read from memory once per V block: 16 x 50 MB
    per call, for 0.4 MB of dh written per chunk and head).

    STORE_QDO False (the reverse pass forms (scale q e^gc)^T do itself, QDO_INLINE): only the
    key decay, one program per chunk and value head (BV = V)."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_cv, i_hv = tl.program_id(0), tl.program_id(1)
    i_c, i_v = i_cv // NV, i_cv % NV
    G: tl.constexpr = HV // H
    i_h = i_hv // G
    _, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, 64, IS_VARLEN)
    t_r = t0 + tl.arange(0, 64)
    m_t = t_r < eos
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    if STORE_QDO:
        b_q = tl.load(q + (t_r[:, None] * H + i_h) * K + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0)
        q_scale = tl.exp(tl.load(gc + t_r * HV + i_hv, mask=m_t, other=0.0)) * scale
        if L2:
            q_scale = q_scale * tl.load(q_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        b_qd = (b_q * q_scale[:, None]).to(b_q.dtype)
        b_do = tl.load(do + (t_r[:, None] * HV + i_hv) * V + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_x = tl.dot(tl.trans(b_qd), b_do.to(b_q.dtype))
        tl.store(dh + (i_c.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :],
                 b_x.to(dh.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        k_scale = tl.where(m_t, tl.exp(_suffix(_chunk_g(g, gc, t_r * HV + i_hv, m_t, HV, HAS_G))),
                           0.0)
        if L2:
            k_scale = k_scale * tl.load(k_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        tl.store(kscale + t_r * HV + i_hv, k_scale, mask=m_t)


@triton.jit
def _qdo_operands(q, q_rstd, do, gc, t_r, m_t, i_h, i_hv, o_k, m_k, o_v, m_v, scale,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  L2: tl.constexpr):
    """The operands of one chunk's (scale q e^gc)^T do for the reverse pass: q's [64, BK] rows
    as stored, and do's [64, BV] rows times scale e^gc (q's rstd with L2) in q's dtype (the row
    scale on do: the narrower tile where V blocks are narrower than K)."""
    b_q = tl.load(q + (t_r[:, None] * H + i_h) * K + o_k[None, :],
                  mask=m_t[:, None] & m_k[None, :], other=0.0)
    s = tl.exp(tl.load(gc + t_r * HV + i_hv, mask=m_t, other=0.0)) * scale
    if L2:
        s = s * tl.load(q_rstd + t_r * H + i_h, mask=m_t, other=0.0)
    b_do = tl.load(do + (t_r[:, None] * HV + i_hv) * V + o_v[None, :],
                   mask=m_t[:, None] & m_v[None, :], other=0.0)
    return b_q, (b_do * s[:, None]).to(b_q.dtype)


def _dh_shared_bytes(config, args) -> int:
    """Shared memory of one _bwd_dh_kernel launch, estimated as for the forward state pass:
    num_stages copies of the k and w tiles ([64, BK]), the dv tile ([64, BV]) and the qdo tile
    ([BK, BV] in dh's dtype; with QDO_INLINE its operands, q [64, BK] and do [64, BV] in q's
    dtype), plus 10%."""
    bk, bv = args["BK"], config.kwargs["BV"]
    if args.get("QDO_INLINE"):
        qdo = 64 * (bk + bv) * args["k"].element_size()
    else:
        qdo = bk * bv * args["dh"].element_size()
    tiles = (64 * bk * (args["k"].element_size() + args["w"].element_size())
             + 64 * bv * args["dv"].element_size() + qdo)
    return int(1.1 * config.num_stages * tiles)


# PAR_CLASS: as in the forward state pass, B = 1 with few heads (S2: 16 value heads, 32
# programs at BV = 64) wants narrow V blocks, large batches wide ones (BV 64 / 8 warps won at
# S1, S3, S5 among BV 32 / 64 x 4 / 8 warps). ROW_SCALE: where the key decay goes, on the rows
# of the [64, BV] product (fp32, after the dot: S3 0.646 -> 0.575 ms on H200, run 7) or on the
# [64, K] k operand before it. Row scaling compiled by Triton 3.6 with 4 warps read out of
# bounds on H200 (BV 16 and 32: illegal addresses at S2 and in small tests, NaN in dh0; run 7,
# benchmarks/diag_configs.py), so the 4-warp narrow configs scale the operand, as in run 6
# (S2 dh 1.25 ms with BV 16, exact in that run's GPU tests). BV 32 row-scaled at 8 warps (with
# or without a 128-register cap) also hit an illegal address at S4 on an H100 (tenth session's
# dh sweep): not a candidate. BV 32 / 4 warps on the k operand (two stages) and BV 64 / 8 warps
# on k were exact there and not faster (5.71, 5.76 against 5.66 ms fwd+bwd). The wide launch at
# two stages fits at S4 by ptxas (188.7 KB; the estimate below says 234 KB, so it is pruned
# there) and at K = V = 128 (106.7 KB): a candidate wherever the estimate lets it run. The
# narrow launch at one stage, never picked over two (GPU logs since run 7), is no longer
# timed: each candidate adds to a new shape's first call.
_DH_WIDE = [triton.Config({"BV": 64, "ROW_SCALE": True}, num_warps=8, num_stages=s)
            for s in (1, 2)]
_DH_NARROW = [triton.Config({"BV": 16, "ROW_SCALE": False}, num_warps=4, num_stages=2)] + _DH_WIDE


# The dh pass loads the next step's qdo tile, dv_local and decay one step ahead (PREFETCH)
# where K <= this: the tiles then stay in registers for a step, which at K = 256 (255
# registers already, offline sm_90a) spills 120-290 B per thread; at K = V = 128 none (BV 16 /
# 4 warps 130 registers, BV 64 / 8 warps 221-227)
DH_PREFETCH_MAX_K = 128


# the reverse pass forms each chunk's (scale q e^gc)^T do itself (True) or reads it from the
# parallel _bwd_qdo_kernel launch through the dh buffer (False): a module switch for
# benchmarks/bench_kernels.py --ab-qdo-inline. Only where the pass prefetches (K <= 128): at
# K = 256 the q tile would take another [64, 256] in registers or shared memory beside 255
# registers (fp32, one stage: 272 KB of shared memory by ptxas, over sm_90's 227 KB). Offline
# (sm_90a, bf16, K = V = 128, benchmarks/loop_loads.py S3): BV 64 / 8 warps / two stages 227 ->
# 236 registers, BV 16 / 4 warps 168 -> 220, no spills; the q, do tiles and their row scale
# loaded a step ahead. H100 (2026-12-07, run 13): qdo + dh at S3 0.63 -> 0.51 ms, fwd+bwd 4.69
# -> 4.58, S1 2.36 -> 2.32, with the wide launch (BV 64 / 8 warps); at S2 the narrow launch
# (BV 16 / 4 warps, 16 value heads of one sequence) got slower, 1.18 -> 1.32 ms (fwd+bwd 5.57
# -> 5.72). So only where the pass's parallelism class offers the wide configs alone (64 or
# more (sequence, value head) pairs: S1, S3; qdo_inline)
QDO_INLINE = True


def dh_prefetch(BK: int) -> bool:
    """_bwd_dh_kernel's PREFETCH at key block BK (read at each launch: tests and benchmarks
    switch it by setting DH_PREFETCH_MAX_K)."""
    return BK <= DH_PREFETCH_MAX_K


def qdo_inline(BK: int, par_class: int) -> bool:
    """_bwd_dh_kernel's QDO_INLINE at key block BK and parallelism class par_class
    (_parallelism_class of the pass's (sequence, value head) pairs): QDO_INLINE where
    K <= 128 and the class is past the narrow one."""
    return QDO_INLINE and BK <= 128 and par_class > 0


# the reverse pass's autotuning, also its register-capped twin's (_dh_kernel): the interpreter's
# config, the key; dv is updated in place (dv_local -> dv_new) and dh holds (q e^gc)^T do until
# the pass overwrites it, so autotuning reruns must start from both
_DH_TUNING = dict(
    interpret_config=triton.Config({"BV": 32, "ROW_SCALE": True}, num_warps=4, num_stages=1),
    key=["H", "HV", "K", "V", "IS_VARLEN", "USE_DHT", "USE_H0", "PAR_CLASS"],
    restore_value=["dv", "dh"],
)


@autotune_or_fixed(
    configs=_DH_NARROW,
    prune_configs_by=by_parallelism(_DH_NARROW, _DH_WIDE, _dh_shared_bytes),
    **_DH_TUNING,
)
@triton.jit
def _bwd_dh_kernel(
    k, w, gc, kscale, dv, dht, dh, dh0, q, q_rstd, do, scale,
    cu_seqlens, chunk_offsets, T, NT_SEQ, PAR_CLASS,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREFETCH: tl.constexpr, ROW_SCALE: tl.constexpr, QDO_INLINE: tl.constexpr,
    L2: tl.constexpr,
):
    # kscale: the key decay e^(gl - gc) (k's rstd included) that _bwd_qdo_kernel stored.
    # QDO_INLINE: each step forms its chunk's (scale q e^gc)^T do from q and do (q_rstd with
    # L2), instead of reading what _bwd_qdo_kernel stored in the dh buffer: the dot does not
    # depend on the carried dh, and the [K, V] tile per chunk is neither written nor read back
    i_v, i_n, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = HV // H
    i_h = i_hv // G
    bos, eos, nt, c_off = sequence_bounds(i_n, cu_seqlens, chunk_offsets, T, NT_SEQ, 64,
                                          IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    r = tl.arange(0, 64)
    state_off = (i_n.to(tl.int64) * HV + i_hv) * K * V
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + state_off + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
    # Triton's pipeliner prefetches only the loads that reach a dot operand within the same
    # step (k, w, the key decay): the qdo tile and the decay e^gl feed the carried dh, dv_local
    # the first dot's accumulator, so they are plain loads waited on at every step (offline
    # sm_90a TTGIR). With PREFETCH they are issued one step ahead, by hand, and used
    # (converted) only in the next step, so the wait overlaps a step's work (the launcher's
    # choice, dh_prefetch).
    if PREFETCH:
        # (scale q e^gc)^T do (or its operands), dv_local and gl of the sequence's last chunk
        t_l = bos + (nt - 1) * 64 + r
        m_lr = (t_l < eos) & (nt > 0)
        m_l = m_lr[:, None] & m_v[None, :]
        if QDO_INLINE:
            n_q, n_dos = _qdo_operands(q, q_rstd, do, gc, t_l, m_lr, i_h, i_hv, o_k, m_k, o_v,
                                       m_v, scale, H, HV, K, V, L2)
        else:
            n_qdo = tl.load(dh + ((c_off + nt - 1) * HV + i_hv) * K * V + o_k[:, None] * V
                            + o_v[None, :], mask=m_kv & (nt > 0), other=0.0)
        n_dv = tl.load(dv + (t_l[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_l, other=0.0)
        n_gl = tl.load(gc + (tl.minimum(bos + nt * 64, eos) - 1) * HV + i_hv, mask=nt > 0,
                       other=0.0)
    for i_r in range(0, nt):
        i_t = nt - 1 - i_r
        t_r = bos + i_t * 64 + r
        m_t = t_r < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_dh = dh + ((c_off + i_t) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        p_dv = dv + (t_r[:, None] * HV + i_hv) * V + o_v[None, :]
        if PREFETCH:
            b_dvl, g_last = n_dv, n_gl
            if QDO_INLINE:
                b_qdo = tl.dot(tl.trans(n_q), n_dos)
            else:
                b_qdo = n_qdo
            # the next step's: chunk i_t - 1 (whole: only a sequence's last chunk is partial;
            # none after the first chunk), other slots than the two this step stores to
            has_prev = i_t > 0
            if QDO_INLINE:
                n_q, n_dos = _qdo_operands(q, q_rstd, do, gc, t_r - 64, (r < 64) & has_prev, i_h,
                                           i_hv, o_k, m_k, o_v, m_v, scale, H, HV, K, V, L2)
            else:
                n_qdo = tl.load(p_dh - HV * K * V, mask=m_kv & has_prev, other=0.0)
            n_dv = tl.load(p_dv - 64 * HV * V, mask=m_v[None, :] & has_prev, other=0.0)
            n_gl = tl.load(gc + (bos + i_t * 64 - 1) * HV + i_hv, mask=has_prev, other=0.0)
        else:
            if QDO_INLINE:
                b_q, b_dos = _qdo_operands(q, q_rstd, do, gc, t_r, m_t, i_h, i_hv, o_k, m_k, o_v,
                                           m_v, scale, H, HV, K, V, L2)
                b_qdo = tl.dot(tl.trans(b_q), b_dos)
            else:
                # (scale q e^gc)^T do of this chunk (_bwd_qdo_kernel), read before dh takes
                # its slot
                b_qdo = tl.load(p_dh, mask=m_kv, other=0.0)
            b_dvl = tl.load(p_dv, mask=m_tv, other=0.0)
            g_last = tl.load(gc + (tl.minimum(bos + i_t * 64 + 64, eos) - 1) * HV + i_hv)
        tl.store(p_dh, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        b_k = tl.load(k + (t_r[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_w = tl.load(w + (t_r[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_dv = b_dvl.to(tl.float32)
        k_scale = tl.load(kscale + t_r * HV + i_hv, mask=m_t, other=0.0)
        if ROW_SCALE:
            # on the [64, BV] product's rows, in fp32: k goes to the dot as loaded (no per-step
            # rescale and re-stage of the whole k tile; the forward state pass scales v_new so)
            b_dv += tl.dot(b_k, b_dh.to(b_k.dtype)) * k_scale[:, None]
        else:
            b_kd = (b_k * k_scale[:, None]).to(b_k.dtype)
            b_dv += tl.dot(b_kd, b_dh.to(b_k.dtype))
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_dh = (b_dh * tl.exp(g_last) + b_qdo.to(tl.float32)
                - tl.dot(tl.trans(b_w), b_dv.to(b_w.dtype)))
    if USE_H0:
        tl.store(dh0 + state_off + o_k[:, None] * V + o_v[None, :], b_dh, mask=m_kv)


@triton.jit
def _load_qk(q, k, q_rstd, k_rstd, p_qk, m_tk, p_r, m_t, L2: tl.constexpr):
    """q, k rows of a chunk (l2-normalised if L2): in their dtype and in float32."""
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0)
    b_qn = b_q.to(tl.float32)
    b_kn = b_k.to(tl.float32)
    if L2:
        b_qn = b_qn * tl.load(q_rstd + p_r, mask=m_t, other=0.0)[:, None]
        b_kn = b_kn * tl.load(k_rstd + p_r, mask=m_t, other=0.0)[:, None]
        b_q = b_qn.to(b_q.dtype)
        b_k = b_kn.to(b_k.dtype)
    return b_q, b_k, b_qn, b_kn


@triton.jit
def _load_rows(x, x_rstd, p_x, m_tk, p_r, m_t, L2: tl.constexpr):
    """q or k rows of a chunk as a dot operand, in their dtype (l2-normalised if L2, rounded
    once as _load_qk does)."""
    b_x = tl.load(x + p_x, mask=m_tk, other=0.0)
    if L2:
        rstd = tl.load(x_rstd + p_r, mask=m_t, other=0.0)
        b_x = (b_x.to(tl.float32) * rstd[:, None]).to(b_x.dtype)
    return b_x


@triton.jit
def _gram_qk(q, k, q_rstd, k_rstd, p_r, m_t, K: tl.constexpr, BKC: tl.constexpr,
             L2: tl.constexpr):
    """k k^T and q k^T of a chunk ([64, 64] float32, l2-normalised if L2), accumulated over
    K in BKC-wide column blocks: keeps the dot operands small in shared memory at K = 256."""
    b_kk = tl.zeros([64, 64], dtype=tl.float32)
    b_qk = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKC)):
        cols = i_k * BKC + tl.arange(0, BKC)
        m = m_t[:, None] & (cols < K)[None, :]
        b_k = tl.load(k + p_r[:, None] * K + cols[None, :], mask=m, other=0.0)
        b_q = tl.load(q + p_r[:, None] * K + cols[None, :], mask=m, other=0.0)
        b_kk += tl.dot(b_k, tl.trans(b_k))
        b_qk += tl.dot(b_q, tl.trans(b_k))
    if L2:
        rk = tl.load(k_rstd + p_r, mask=m_t, other=0.0)
        rq = tl.load(q_rstd + p_r, mask=m_t, other=0.0)
        b_kk = b_kk * rk[:, None] * rk[None, :]
        b_qk = b_qk * rq[:, None] * rk[None, :]
    return b_kk, b_qk


# ---------------------------------------------------------------------------------------------
# 5a, 5b. gradients of q, k, v, g, beta in two launches
# ---------------------------------------------------------------------------------------------

@triton.jit
def _grad_rows(i_c, i_p, cu_seqlens, chunk_indices, T, NT_SEQ, H: tl.constexpr,
               HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, IS_VARLEN: tl.constexpr,
               LOOP_G: tl.constexpr, k0):
    """What both gradient launches derive from their program ids: the key head, the chunk's
    rows (global token indices, mask, end), the key columns k0 .. k0 + BK - 1, q / k offsets
    of the rows and the causal mask (j <= i, valid rows)."""
    i_h = (i_p * LOOP_G) // (HV // H)
    _, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, 64, IS_VARLEN)
    r = tl.arange(0, 64)
    t_r = t0 + r
    m_t = t_r < eos
    o_k = k0 + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_qk = (t_r[:, None] * H + i_h) * K + o_k[None, :]
    causal = (r[:, None] >= r[None, :]) & m_t[:, None]
    return i_h, eos, t0, r, t_r, m_t, o_k, m_k, m_tk, p_qk, causal


@triton.jit
def _l2norm_bwd(dxn, xn, rstd):
    """The fused l2-norm's backward, rows of [64, BK]: dx = rstd (dxn - xn (xn . dxn))."""
    return rstd[:, None] * (dxn - xn * tl.sum(xn * dxn, 1)[:, None])


@triton.jit
def _exclusive_cumsum(x):
    """y_r = sum_{j < r} x_j ([64]) as a masked row sum: no "cumsum - x" difference."""
    r = tl.arange(0, 64)
    return tl.sum(tl.where(r[None, :] < r[:, None], x[None, :], 0.0), 1)


# BV 64 at 8 warps first: offline (ptxas -v, sm_90a, bf16, K = V = 128) 218 / 248 registers
# without spills, where 4 warps spill 0.3 / 0.9 KB per thread. Yet 4 warps with two stages
# was the fastest pin at S3 on an H200 (benchmarks/diag_configs.py, 2026-11-27 run 8: model
# forward+backward 8.07 ms against 8.32 autotuned over the first two, 8.76 at 8 warps / two
# stages; same errors): the spills are hidden behind the pipelined loads. The interpreter
# runs BV 32 so that the tests cross V blocks. (8 warps capped at 128 registers, two programs
# per SM with 0.4 KB of spills per thread, was a candidate from the ninth session on and never
# picked: dropped, as each candidate adds to a new shape's first call.)
# 4 warps at one stage never won (GPU logs to 2026-12-07): dropped. 8 warps at one stage won at
# S4 on the H100 (benchmarks/logs/2026-12-07-h100-s10/kernels-s4.log), 4 warps at two stages
# everywhere else. (BV 128 at 8 warps, one step over V = 128 with 255 registers and no spills
# offline, was tried in the thirteenth session and not picked at S1-S3 on the H100.)
# SPLIT_DQ (fifteenth session, not yet timed on a GPU): dq's do h^T in a second V loop. Offline
# (sm_90a, bf16, K = V = 128, 4 warps / two stages) 24 B of spills per thread instead of 296
# (636 before the post-loop reordering of the same session), 64 KB of shared memory instead
# of 96; at K = 256 / V = 512 the 4-warp launch spills 1.4-2 KB either way and 8 warps none.
_GRAD_VQ_CONFIGS = [triton.Config({"BV": 64, "SPLIT_DQ": 0}, num_warps=8, num_stages=1),
                    triton.Config({"BV": 64, "SPLIT_DQ": 0}, num_warps=4, num_stages=2),
                    triton.Config({"BV": 64, "SPLIT_DQ": 1}, num_warps=4, num_stages=2)]


def _prune_grad_vq(configs, named_args, **kwargs):
    """At K <= 128 the 4-warp configs alone (4 warps at two stages was the pick at S1-S3 and
    at the layer's Qwen3-Next shape in every GPU log since run 8; timing the 8-warp one took
    ~2.5 s of the layer's first call, H100, fifteenth session), with dq's product in the first
    V loop or a second (SPLIT_DQ); above, the configs without SPLIT_DQ (which does not take
    the 4-warp launch's spills away there); the first only when not autotuning (the fixed
    config, as before)."""
    K = named_args.get("K", kwargs.get("K"))
    kept = distinct(configs)  # a pin or the fixed config comes listed twice
    if AUTOTUNE:
        if _pow2(K) <= 128:
            kept = [c for c in kept if c.num_warps == 4] or kept
        else:
            kept = [c for c in kept if not c.kwargs.get("SPLIT_DQ")] or kept
    return kept if AUTOTUNE else kept[:1]

# _bwd_grad_k_kernel also takes its key-column block BK from the config (K wider than BK runs
# in blocks, one program each; clamped to the next power of two of K by the pruning).
# Offline (sm_90a, Triton 3.6's ptxas, bf16, 8 warps): whole K = 256 spills 1.4 KB per thread,
# blocks of 128 none (254 registers, one program per SM); blocks of 64 take 166 registers,
# and capped at 128 (maxnreg) spill 8-36 B, so that two programs share an SM (the stage is
# latency-bound at one). With one stage the V loop's four loads (v_new, dv_new, h, dh') are
# waited on at each step (offline TTGIR); two stages prefetch them (cp.async) at 8 warps
# without spills: blocks of 128 242-254 registers, 64 KB shared; of 64 175 registers, 48 KB,
# at K = V = 128 and K 256 / V 512. (Replaced: 4 warps / two stages and whole K = 256, which
# spilled 0.25 and 1.4 KB per thread and never won.) The first config (the fixed one under
# MEGATRON_GDN_AUTOTUNE=0) is the launch of run 8 at K <= 128.
# Picks in the GPU logs to 2026-12-07: blocks of 128 at two stages at S1-S3 on the H100
# (2026-12-07-h100-s13), of 128 at one stage before that config existed, of 64 capped at 128
# registers at S4; blocks of 64 uncapped at one stage never: dropped. Blocks of 64 were never
# picked where K <= 128 (S1-S3 on H100 and H200): there they are pruned, ~2.5 s less autotuning
# in a new shape's first call (the layer's, H100, fifteenth session: 5.6 s for the four).
_GRAD_K_CONFIGS = [
    triton.Config({"BV": 64, "BK": 128}, num_warps=8, num_stages=1),
    triton.Config({"BV": 64, "BK": 64}, num_warps=8, num_stages=1, maxnreg=128),
    triton.Config({"BV": 64, "BK": 128}, num_warps=8, num_stages=2),
    triton.Config({"BV": 64, "BK": 64}, num_warps=8, num_stages=2),
]


def _grad_k_block(config, K: int) -> int:
    """The key-column block a _bwd_grad_k_kernel config launches with at this K."""
    return min(config.kwargs.get("BK", 128), _pow2(K))


def _prune_grad_k(configs, named_args, **kwargs):
    """Each config's BK clamped to the next power of two of K (16 at least), duplicates
    dropped; at K <= 128 only the configs of the widest block (whole K in one program); the
    first only when not autotuning."""
    K = named_args.get("K", kwargs.get("K"))
    widest = max(c.kwargs.get("BK", 128) for c in configs)
    seen, kept = set(), []
    for c in configs:
        if _pow2(K) <= 128 and c.kwargs.get("BK", 128) < widest:
            continue
        bk = _grad_k_block(c, K)
        key = (bk, c.kwargs["BV"], c.num_warps, c.num_stages, c.maxnreg)
        if key not in seen:
            seen.add(key)
            kept.append(triton.Config(dict(c.kwargs, BK=bk), num_warps=c.num_warps,
                                      num_stages=c.num_stages, maxnreg=c.maxnreg))
    return kept if AUTOTUNE else kept[:1]


@autotune_or_fixed(
    configs=_GRAD_VQ_CONFIGS,
    # 32 columns: the tests cross V blocks; dq's product in its own loop (both ways pinned:
    # tests/kernels/test_chunk_bwd.py::test_grad_vq_dq_loop)
    interpret_config=triton.Config({"BV": 32, "SPLIT_DQ": 1}, num_warps=4, num_stages=1),
    key=["H", "HV", "K", "V", "L2", "IS_VARLEN", "LOOP_G"],
    prune_configs_by={"early_config_prune": _prune_grad_vq},
)
@triton.jit
def _bwd_grad_vq_kernel(
    q, k, v, g, gc, beta, q_rstd, k_rstd, tm, h, v_new, dv2, do,
    dq, dv, pm, m2, dg, dbeta, scale,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr,
    HAS_G: tl.constexpr, IS_VARLEN: tl.constexpr, LOOP_G: tl.constexpr, SPLIT_DQ: tl.constexpr,
):
    """The first half of the gradients, per (chunk, value head) (LOOP_G = 1) or (chunk, key
    head) (LOOP_G = G), everything that reduces over V through do, v_new and dvb:
    dvb = Tm^T dv_new (dv = beta dvb), Ds_raw = do v_new^T, dA = -dvb v_new^T and dq in full
    (s e^gc do h^T + Ds k). Stores for _bwd_grad_k_kernel the two C x C matrices dk needs,
    pm = Ds (into `pm`) and bE + bE^T (into `m2`), both [B, T, HV, 64] in q's dtype, and writes
    the parts of dg and dbeta that are known here (pairs X of Ds and E; a = q . dq_inter;
    rowsum(v dvb) + rowsum(E k k^T)); the second launch adds its own.

    SPLIT_DQ (the config's): do h^T, dq's [64, BK] accumulator, in a second V loop after the C x C
    matrices are stored (do read twice, from L2 the second time), instead of beside Ds and dA
    in the first: at 4 warps the one loop's three accumulators spill (sm_90a)."""
    i_c, i_p = tl.program_id(0), tl.program_id(1)
    OH: tl.constexpr = HV // LOOP_G
    i_h, eos, t0, r, t_r, m_t, o_k, m_k, m_tk, p_qk, causal = _grad_rows(
        i_c, i_p, cu_seqlens, chunk_indices, T, NT_SEQ, H, HV, K, BK, IS_VARLEN, LOOP_G, 0)
    lower = (r[:, None] > r[None, :]) & m_t[:, None]
    acc_dq = tl.zeros([64, BK], dtype=tl.float32)
    for i_g in tl.static_range(LOOP_G):
        i_hv = i_p * LOOP_G + i_g
        b_beta = tl.load(beta + t_r * HV + i_hv, mask=m_t, other=0.0)
        b_tmt = tl.trans(tl.load(tm + (t_r[:, None] * HV + i_hv) * 64 + r[None, :],
                                 mask=causal, other=0.0).to(dv2.dtype.element_ty))
        h_base = h + (i_c.to(tl.int64) * HV + i_hv) * K * V
        b_ds = tl.zeros([64, 64], dtype=tl.float32)
        b_da = tl.zeros([64, 64], dtype=tl.float32)
        b_dqi = tl.zeros([64, BK], dtype=tl.float32)
        b_db = tl.zeros([64], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            p_tv = (t_r[:, None] * HV + i_hv) * V + o_v[None, :]
            b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
            b_vn = tl.load(v_new + p_tv, mask=m_tv, other=0.0)
            b_dv2 = tl.load(dv2 + p_tv, mask=m_tv, other=0.0)
            b_ds += tl.dot(b_do, tl.trans(b_vn))
            if not SPLIT_DQ:
                b_h = tl.load(h_base + o_k[:, None] * V + o_v[None, :],
                              mask=m_k[:, None] & m_v[None, :], other=0.0)
                b_dqi += tl.dot(b_do, tl.trans(b_h.to(b_do.dtype)))
            b_dvb = tl.dot(b_tmt, b_dv2)
            b_da += tl.dot(b_dvb.to(b_vn.dtype), tl.trans(b_vn))
            tl.store(dv + p_tv, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
            b_v = tl.load(v + p_tv, mask=m_tv, other=0.0)
            b_db += tl.sum(b_v.to(tl.float32) * b_dvb, 1)

        # in the order that frees registers soonest: Ds, dA -> pm, E; then the Gram matrices
        # for X; q, k last
        # masked rows hold g = 0, so seg <= 0 wherever it is used: no overflow
        e_seg = tl.exp(_segsum(_chunk_g(g, gc, t_r * HV + i_hv, m_t, HV, HAS_G)))
        b_pm = tl.where(causal, b_ds * e_seg, 0.0) * scale
        b_e = tl.where(lower, -b_da * e_seg, 0.0)
        b_be = b_e * b_beta[:, None]
        p_cc = (t_r[:, None] * HV + i_hv) * 64 + r[None, :]
        tl.store(pm + p_cc, b_pm.to(pm.dtype.element_ty), mask=m_t[:, None])
        tl.store(m2 + p_cc, (b_be + tl.trans(b_be)).to(m2.dtype.element_ty), mask=m_t[:, None])
        b_kk, b_qk = _gram_qk(q, k, q_rstd, k_rstd, t_r * H + i_h, m_t, K, BKC, L2)
        b_x = tl.where(lower, b_pm * b_qk + b_be * b_kk, 0.0)
        b_db += tl.sum(b_e * b_kk, 1)
        # dg_r = sum_{i >= r} a_i + sum_{i >= r, j < r} X[i, j] over this launch's terms: X's
        # part first (X dead before dq's accumulator is needed)
        b_y = tl.cumsum(b_x, 0, reverse=True)
        b_dg = tl.sum(tl.where(r[None, :] < r[:, None], b_y, 0.0), 1)
        if SPLIT_DQ:
            for i_v in range(0, tl.cdiv(V, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < V
                b_do = tl.load(do + (t_r[:, None] * HV + i_hv) * V + o_v[None, :],
                               mask=m_t[:, None] & m_v[None, :], other=0.0)
                b_h = tl.load(h_base + o_k[:, None] * V + o_v[None, :],
                              mask=m_k[:, None] & m_v[None, :], other=0.0)
                b_dqi += tl.dot(b_do, tl.trans(b_h.to(b_do.dtype)))
        # a_i = q_i . (s e^gc_i do_i h^T) with the normalised q, from the raw rows and a row
        # scale
        e_gcs = tl.exp(tl.load(gc + t_r * HV + i_hv, mask=m_t, other=0.0)) * scale
        a_scale = e_gcs
        if L2:
            a_scale = a_scale * tl.load(q_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        b_a = tl.sum(tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32) * b_dqi, 1) * a_scale
        b_dg += tl.cumsum(b_a, 0, reverse=True)
        tl.store(dg + t_r * HV + i_hv, b_dg, mask=m_t)
        tl.store(dbeta + t_r * HV + i_hv, b_db, mask=m_t)
        b_k = _load_rows(k, k_rstd, p_qk, m_tk, t_r * H + i_h, m_t, L2)
        dq_hv = b_dqi * e_gcs[:, None] + tl.dot(b_pm.to(b_k.dtype), b_k)
        if i_g == 0:
            acc_dq = dq_hv
        else:
            acc_dq += dq_hv

    if L2:
        # the normalised q rows again (from L2), rather than kept live through the group loop
        rq = tl.load(q_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        b_qn = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32) * rq[:, None]
        acc_dq = _l2norm_bwd(acc_dq, b_qn, rq)
    tl.store(dq + (t_r[:, None] * OH + i_p) * K + o_k[None, :], acc_dq.to(dq.dtype.element_ty),
             mask=m_tk)


@autotune_or_fixed(
    configs=_GRAD_K_CONFIGS,
    # 16-column blocks: the tests cross key-column blocks from K = 32 on
    interpret_config=triton.Config({"BV": 32, "BK": 16}, num_warps=4, num_stages=1),
    key=["H", "HV", "K", "V", "L2", "IS_VARLEN", "LOOP_G"],
    prune_configs_by={"early_config_prune": _prune_grad_k},
)
@triton.jit
def _bwd_grad_k_kernel(
    q, k, g, gc, beta, q_rstd, k_rstd, tm, h, dh, v_new, dv2, pm, m2,
    dk, dk_raw, dg_part, dbeta_part, part_stride,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr,
    HAS_G: tl.constexpr, IS_VARLEN: tl.constexpr, LOOP_G: tl.constexpr,
):
    """The second half, after _bwd_grad_vq_kernel: dk and the rest of dg, dbeta. Reduces over
    V only v_new dh'^T and dv_new h^T; dkb = -dvb h^T = -Tm^T (dv_new h^T) takes Tm^T after
    the loop, so dvb is neither stored nor recomputed. Adds to dg, dbeta: a = beta e^gc
    (k . dkb) + [i = last] e^gl sum(h * dh'), the suffix-sum pairs (b_j = k_j . dk_h_j, the
    last row of X) and e^gc (k . dkb).

    The key columns run in blocks of BK (the config's), one program each.
    Everything this launch adds to dg and dbeta is a sum over key columns, linear in a
    block's part, so each block writes its part to its own slice of dg_part, dbeta_part
    ([blocks, B, T, HV], part_stride = B T HV elements apart) for the launcher to add to the
    first launch's; with several blocks (SPLIT_K) and the l2-norm, dk goes to dk_raw (fp32
    at K > 128, else dk itself) before the norm's backward, which needs whole rows (the
    launcher applies it)."""
    # program id 0 runs over (chunk, key-column block), the blocks of a chunk adjacent: each
    # reads the chunk's whole v_new, dv_new, pm and m2 rows, from L2 after the first
    NKB: tl.constexpr = (K + BK - 1) // BK
    i_ck, i_p = tl.program_id(0), tl.program_id(1)
    i_c, i_kb = i_ck // NKB, i_ck % NKB
    OH: tl.constexpr = HV // LOOP_G
    SPLIT_K: tl.constexpr = BK < K
    k0 = 0
    if SPLIT_K:  # a constant 0 otherwise: no runtime offset in the column indices
        k0 = i_kb * BK
    i_h, eos, t0, r, t_r, m_t, o_k, m_k, m_tk, p_qk, causal = _grad_rows(
        i_c, i_p, cu_seqlens, chunk_indices, T, NT_SEQ, H, HV, K, BK, IS_VARLEN, LOOP_G, k0)
    t_last = tl.minimum(t0 + 64, eos) - 1
    acc_dk = tl.zeros([64, BK], dtype=tl.float32)
    for i_g in tl.static_range(LOOP_G):
        i_hv = i_p * LOOP_G + i_g
        h_base = h + (i_c.to(tl.int64) * HV + i_hv) * K * V
        dh_base = dh + (i_c.to(tl.int64) * HV + i_hv) * K * V
        b_dkh = tl.zeros([64, BK], dtype=tl.float32)
        b_y = tl.zeros([64, BK], dtype=tl.float32)
        b_hdh = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            p_tv = (t_r[:, None] * HV + i_hv) * V + o_v[None, :]
            b_vn = tl.load(v_new + p_tv, mask=m_tv, other=0.0)
            b_dv2 = tl.load(dv2 + p_tv, mask=m_tv, other=0.0)
            b_h = tl.load(h_base + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_dh = tl.load(dh_base + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_dkh += tl.dot(b_vn, tl.trans(b_dh.to(b_vn.dtype)))
            b_y += tl.dot(b_dv2, tl.trans(b_h.to(b_dv2.dtype)))
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
        b_tmt = tl.trans(tl.load(tm + (t_r[:, None] * HV + i_hv) * 64 + r[None, :],
                                 mask=causal, other=0.0).to(dv2.dtype.element_ty))
        # dkb = -dvb h^T, kept as +Tm^T (dv_new h^T); the sign goes into its uses
        b_dkb = tl.dot(b_tmt, b_y.to(b_tmt.dtype))

        b_q, b_k, _, b_kn = _load_qk(q, k, q_rstd, k_rstd, p_qk, m_tk, t_r * H + i_h, m_t, L2)
        b_g = _chunk_g(g, gc, t_r * HV + i_hv, m_t, HV, HAS_G)
        e_gc = tl.exp(tl.load(gc + t_r * HV + i_hv, mask=m_t, other=0.0))
        b_beta = tl.load(beta + t_r * HV + i_hv, mask=m_t, other=0.0)
        g_last = tl.load(gc + t_last * HV + i_hv)
        dk_hv = b_dkh * tl.where(m_t, tl.exp(_suffix(b_g)), 0.0)[:, None]
        b_sfx = tl.sum(b_kn * dk_hv, 1)
        p_cc = (t_r[:, None] * HV + i_hv) * 64 + r[None, :]
        b_pm = tl.load(pm + p_cc, mask=m_t[:, None], other=0.0)
        b_m2 = tl.load(m2 + p_cc, mask=m_t[:, None], other=0.0)
        dk_hv += tl.dot(tl.trans(b_pm), b_q)
        dk_hv += tl.dot(b_m2, b_k)
        kb_scale = b_beta * e_gc
        k_dkb = -tl.sum(b_kn * b_dkb, 1)
        dk_hv -= b_dkb * kb_scale[:, None]
        b_a = kb_scale * k_dkb + tl.where(t_r == t_last, tl.exp(g_last) * tl.sum(b_hdh, 0), 0.0)
        # masked rows have g = 0 and k = 0: b_j sits in the last row of X also in a partial
        # chunk, and reaches dg_r for every r > j
        b_dg = _exclusive_cumsum(b_sfx) + tl.cumsum(b_a, 0, reverse=True)
        p_r = t_r * HV + i_hv
        p_part = i_kb.to(tl.int64) * part_stride + p_r
        tl.store(dg_part + p_part, b_dg, mask=m_t)
        tl.store(dbeta_part + p_part, e_gc * k_dkb, mask=m_t)
        if i_g == 0:
            acc_dk = dk_hv
        else:
            acc_dk += dk_hv

    p_dk = (t_r[:, None] * OH + i_p) * K + o_k[None, :]
    if SPLIT_K and L2:
        tl.store(dk_raw + p_dk, acc_dk.to(dk_raw.dtype.element_ty), mask=m_tk)
    else:
        if L2:
            acc_dk = _l2norm_bwd(acc_dk, b_kn,
                                 tl.load(k_rstd + t_r * H + i_h, mask=m_t, other=0.0))
        tl.store(dk + p_dk, acc_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def _l2norm_bwd_rows_kernel(dkn, k, k_rstd, dk, H: tl.constexpr, OH: tl.constexpr,
                            K: tl.constexpr, BK: tl.constexpr):
    """The fused l2-norm's backward on whole rows, after the key-column blocks of
    _bwd_grad_k_kernel: dk = rstd (dkn - kn (kn . dkn)), kn = k rstd; one program per row of
    dkn [B, T, OH, K] (fp32, or dk itself: each program reads its row before writing it; OH
    heads, row head i reading key head i // (OH // H))."""
    row = tl.program_id(0).to(tl.int64)
    i_t, i_o = row // OH, row % OH
    r_k = i_t * H + i_o // (OH // H)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    rstd = tl.load(k_rstd + r_k)
    b_kn = tl.load(k + r_k * K + o_k, mask=m_k, other=0.0).to(tl.float32) * rstd
    b_d = tl.load(dkn + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_dk = rstd * (b_d - b_kn * tl.sum(b_kn * b_d, 0))
    tl.store(dk + row * K + o_k, b_dk.to(dk.dtype.element_ty), mask=m_k)


@triton.jit
def _group_sum_kernel(x, y, out_x, out_y, R, G: tl.constexpr, K: tl.constexpr, BR: tl.constexpr,
                      BK: tl.constexpr):
    """out_x[r] = sum_g x[r, g] and out_y[r] = sum_g y[r, g] over rows r of x, y [R, G, K],
    summed in float32 and rounded once to the outputs' dtype, as torch's sum of half tensors
    does; BR rows per program."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m = (rows < R)[:, None] & (o_k < K)[None, :]
    p_in = rows[:, None].to(tl.int64) * (G * K) + o_k[None, :]
    p_out = rows[:, None].to(tl.int64) * K + o_k[None, :]
    acc_x = tl.zeros([BR, BK], dtype=tl.float32)
    acc_y = tl.zeros([BR, BK], dtype=tl.float32)
    for i_g in tl.static_range(G):
        acc_x += tl.load(x + p_in + i_g * K, mask=m, other=0.0).to(tl.float32)
        acc_y += tl.load(y + p_in + i_g * K, mask=m, other=0.0).to(tl.float32)
    tl.store(out_x + p_out, acc_x.to(out_x.dtype.element_ty), mask=m)
    tl.store(out_y + p_out, acc_y.to(out_y.dtype.element_ty), mask=m)


def group_sum(x: torch.Tensor, y: torch.Tensor, G: int):
    """The GVA group sum of the per-value-head gradients dq, dk: x, y [B, T, H * G, K] ->
    [B, T, H, K] each (value head i belongs to key head i // G), in one launch that reads each
    once and writes the sums (torch's .sum over the group axis ran at ~1.4 TB/s on an H100,
    0.29 ms for dq and dk at S3)."""
    B, T, HV, K = x.shape
    R = B * T * (HV // G)
    BK = _pow2(K)
    BR = max(1, 4096 // BK)
    out_x = x.new_empty(B, T, HV // G, K)
    out_y = y.new_empty(B, T, HV // G, K)
    _group_sum_kernel[(triton.cdiv(R, BR),)](x, y, out_x, out_y, R, G=G, K=K, BR=BR, BK=BK,
                                             num_warps=4)
    return out_x, out_y


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


# the gradient stage per value head (True) or per key head over its G value heads (False): a
# module switch for benchmarks/bench_kernels.py --ab-split-group. Per key head was 0.30 ms
# slower at S3 on an H100 (run 11), and per key head in the dk launch alone 0.32 ms (that
# variant was removed after the run)
SPLIT_GROUP = True


def qdo_config(K: int) -> triton.Config:
    """The one launch config of _bwd_qdo_kernel (not autotuned): a [BK, BV] fp32 tile (BV 16
    under the interpreter, so that the tests cross V blocks)."""
    if INTERPRET:
        return triton.Config({"BV": 16}, num_warps=4)
    return (triton.Config({"BV": 64}, num_warps=4) if _pow2(K) <= 128
            else triton.Config({"BV": 32}, num_warps=8))


def launch_prep(q, k, v, g, gc, beta, q_rstd, k_rstd, do, tm, w, u, dv, scale,
                layout: ChunkLayout, has_tm: bool):
    """_bwd_prep_kernel: w, u (u None: not stored), dv_local into dv, and Tm into tm unless
    has_tm (then read from it); one program per chunk and key or value head (its config's
    PER_HV)."""
    _, _, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    cu, ci, _, T_arg, nts, varlen = layout.kernel_args()
    BK = _pow2(K)

    def grid(meta):
        return (layout.num_chunks, HV if meta["PER_HV"] else H)

    _bwd_prep_kernel[grid](
        q, k, v, g, gc, beta, q_rstd, k_rstd, do, tm, w, u, dv, scale,
        cu, ci, T_arg, nts,
        H=H, HV=HV, K=K, V=V, BK=min(BK, 64), BV=min(_pow2(V), 64), L2=q_rstd is not None,
        HAS_G=g is not None, IS_VARLEN=varlen, HAS_TM=has_tm, STORE_U=u is not None,
    )


def launch_qdo(q, gc, q_rstd, do, dh, scale, layout: ChunkLayout, g=None, k_rstd=None,
               store_qdo: bool = True):
    """Write (scale q e^gc)^T do of every chunk into dh ([NT, HV, K, V]), the reverse pass's
    input (q_rstd, k_rstd not None: the l2-norm option is on), and return the pass's key decay
    kscale = e^(gl - gc) (times k's rstd), [B, T, HV] float32 (g: as in
    chunk_gated_delta_rule_bwd). store_qdo False: the key decay only (dh untouched)."""
    _, _, H, K = q.shape
    HV, V = do.shape[2], do.shape[3]
    cu, ci, _, T_arg, nts, varlen = layout.kernel_args()
    cfg = qdo_config(K)
    bv = cfg.kwargs["BV"] if store_qdo else _pow2(V)
    kscale = torch.empty_like(gc)
    _bwd_qdo_kernel[(layout.num_chunks * triton.cdiv(V, bv), HV)](
        q, gc, q_rstd, do, dh, scale, g, k_rstd, kscale, cu, ci, T_arg, nts,
        H=H, HV=HV, K=K, V=V, BK=_pow2(K), BV=bv, L2=q_rstd is not None, HAS_G=g is not None,
        IS_VARLEN=varlen, STORE_QDO=store_qdo, num_warps=cfg.num_warps,
    )
    return kscale


def launch_dh(q, k, w, gc, q_rstd, k_rstd, do, dv, dht, dh, dh0, scale, layout: ChunkLayout,
              g=None, prefetch: Optional[bool] = None, inline: Optional[bool] = None):
    """The reverse state pass: dh' of every chunk into dh ([NT, HV, K, V]), dv_local ->
    dv_new in place in dv, dh0 (None: no initial state), from dht (None: no final-state
    gradient). _bwd_qdo_kernel first stores the key decay and, unless the pass forms it
    itself (inline; None: qdo_inline), every chunk's (scale q e^gc)^T do into dh. prefetch:
    the pass's hand prefetch (None: dh_prefetch)."""
    if inline is None:
        inline = qdo_inline(_pow2(q.shape[3]), _parallelism_class(layout.num_seqs * do.shape[2]))
    kscale = launch_qdo(q, gc, q_rstd, do, dh, scale, layout, g, k_rstd, store_qdo=not inline)
    launch_dh_pass(q, k, w, gc, q_rstd, kscale, do, dv, dht, dh, dh0, scale, layout,
                   inline=inline, prefetch=prefetch)


def launch_dh_pass(q, k, w, gc, q_rstd, kscale, do, dv, dht, dh, dh0, scale,
                   layout: ChunkLayout, *, inline: bool, prefetch: Optional[bool] = None):
    """_bwd_dh_kernel alone, after launch_qdo (kscale: its key decay; inline: the pass forms
    (scale q e^gc)^T do itself, else dh holds launch_qdo's tiles), as launch_dh runs it."""
    _, _, H, K = q.shape
    HV, V = do.shape[2], do.shape[3]
    cu, _, co, T_arg, nts, varlen = layout.kernel_args()
    BK = _pow2(K)
    par = _parallelism_class(layout.num_seqs * HV)

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), layout.num_seqs, HV)

    _bwd_dh_kernel[grid](
        k, w, gc, kscale, dv, dht, dh, dh0, q, q_rstd, do, scale,
        cu, co, T_arg, nts, par,
        H=H, HV=HV, K=K, V=V, BK=BK,
        USE_DHT=dht is not None, USE_H0=dh0 is not None, IS_VARLEN=varlen,
        PREFETCH=dh_prefetch(BK) if prefetch is None else prefetch, QDO_INLINE=inline,
        L2=q_rstd is not None,
    )


def launch_state_and_dh(q, k, w, u, gc, q_rstd, k_rstd, do, dv, dht, dh, dh0, initial_state,
                        scale, layout: ChunkLayout, g=None):
    """The backward's forward state pass again (h per chunk and v_new, returned), then the
    reverse one (launch_dh: dh, dv_local -> dv_new in dv, dh0), from the prep's w, u and
    dv_local. (Run on a side stream beside the reverse pass, the state pass gained nothing at
    S1-S3 on an H100 and failed the GPU tests: benchmarks/RESULTS.md, 2026-12-08.)"""
    h = torch.empty(layout.num_chunks, w.shape[2], k.shape[3], u.shape[3], dtype=k.dtype,
                    device=k.device)
    v_new = torch.empty_like(u)
    _launch_state(k, w, u, gc, layout, initial_state, k_rstd, h, v_new, None, u.shape[3], True)
    launch_dh(q, k, w, gc, q_rstd, k_rstd, do, dv, dht, dh, dh0, scale, layout, g)
    return h, v_new


def launch_grads(q, k, v, g, gc, beta, q_rstd, k_rstd, tm, h, dh, v_new, dv2, do,
                 scale, layout: ChunkLayout, loop_g: int):
    """The gradient stage: dq, dk ([B, T, HV // loop_g, K], q's dtype; per value head when
    loop_g < G, for the caller to sum over the group), dv, dg, dbeta: _bwd_grad_vq_kernel then
    _bwd_grad_k_kernel, with two [B, T, HV, 64] scratch matrices in q's dtype between them."""
    dq, dv, dg, dbeta, pm, m2 = launch_grad_vq(q, k, v, g, gc, beta, q_rstd, k_rstd, tm, h, v_new,
                                                dv2, do, scale, layout, loop_g)
    dk = launch_grad_k(q, k, g, gc, beta, q_rstd, k_rstd, tm, h, dh, v_new, dv2, pm, m2, dg, dbeta,
                       layout, loop_g)
    return dq, dk, dv, dg, dbeta


def launch_grad_vq(q, k, v, g, gc, beta, q_rstd, k_rstd, tm, h, v_new, dv2, do, scale,
                   layout: ChunkLayout, loop_g: int):
    """_bwd_grad_vq_kernel: dq, dv, the first terms of dg and dbeta, and the scratch pm, m2
    that launch_grad_k reads."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    cu, ci, _, T_arg, nts, varlen = layout.kernel_args()
    BK = _pow2(K)
    dq = q.new_empty(B, T, HV // loop_g, K)
    dv = torch.empty_like(v)
    dg = torch.empty(B, T, HV, dtype=torch.float32, device=q.device)
    dbeta = torch.empty_like(dg)
    pm = q.new_empty(B, T, HV, 64)
    m2 = torch.empty_like(pm)
    _bwd_grad_vq_kernel[(layout.num_chunks, HV // loop_g)](
        q, k, v, g, gc, beta, q_rstd, k_rstd, tm, h, v_new, dv2, do,
        dq, dv, pm, m2, dg, dbeta, scale,
        cu, ci, T_arg, nts,
        H=H, HV=HV, K=K, V=V, BK=BK, BKC=min(BK, 64), L2=q_rstd is not None, HAS_G=g is not None,
        IS_VARLEN=varlen, LOOP_G=loop_g,
    )
    return dq, dv, dg, dbeta, pm, m2


def launch_grad_k(q, k, g, gc, beta, q_rstd, k_rstd, tm, h, dh, v_new, dv2, pm, m2, dg, dbeta,
                  layout: ChunkLayout, loop_g: int):
    """_bwd_grad_k_kernel after launch_grad_vq: returns dk and adds its terms to dg, dbeta (in
    place)."""
    B, T, H, K = q.shape
    HV, V = v_new.shape[2], v_new.shape[3]
    cu, ci, _, T_arg, nts, varlen = layout.kernel_args()
    NT = layout.num_chunks
    BK = _pow2(K)
    l2 = q_rstd is not None
    dk = q.new_empty(B, T, HV // loop_g, K)
    # key-column blocks: the autotuner picks BK; the parts buffers and dk_raw are sized for
    # every config it may run
    kernel = _bwd_grad_k_kernel
    blocks = [triton.cdiv(K, _grad_k_block(c, K)) for c in kernel.configs]
    parts = torch.empty(2, max(blocks), B, T, HV, dtype=torch.float32, device=q.device)
    # dk before the l2-norm's backward: in dk itself (the row kernel then works in place, as
    # fla's separate l2-norm backward does on its bf16 dk), in fp32 where K > 128 splits in
    # every tuned config (that backward subtracts the row's projection on k, which
    # amplifies a bf16 rounding; 100 MB at S4)
    dk_raw = (torch.empty(B, T, HV // loop_g, K, dtype=torch.float32, device=q.device)
              if l2 and max(blocks) > 1 and K > 128 else dk)

    def grid_k(meta):
        return (NT * triton.cdiv(K, meta["BK"]), HV // loop_g)

    kernel[grid_k](
        q, k, g, gc, beta, q_rstd, k_rstd, tm, h, dh, v_new, dv2, pm, m2,
        dk, dk_raw, parts[0], parts[1], B * T * HV,
        cu, ci, T_arg, nts,
        H=H, HV=HV, K=K, V=V, L2=l2, HAS_G=g is not None, IS_VARLEN=varlen, LOOP_G=loop_g,
    )
    nkb = triton.cdiv(K, kernel.best_config.kwargs["BK"])
    dg += parts[0, :nkb].sum(0)
    dbeta += parts[1, :nkb].sum(0)
    if l2 and nkb > 1:
        OH = HV // loop_g
        _l2norm_bwd_rows_kernel[(B * T * OH,)](
            dk_raw, k, k_rstd, dk, H=H, OH=OH, K=K, BK=BK, num_warps=4 if BK <= 256 else 8)
    return dk


def chunk_gated_delta_rule_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    do: torch.Tensor,
    dht: Optional[torch.Tensor],
    layout: ChunkLayout,
    q_rstd: Optional[torch.Tensor] = None,
    k_rstd: Optional[torch.Tensor] = None,
    g: Optional[torch.Tensor] = None,
    split_group: Optional[bool] = None,
    tm: Optional[torch.Tensor] = None,
    states=None,
):
    """Gradients of the chunked gated delta rule (interface fixed in chunk.py).

    Args:
        q, k: [B, T, H, K] raw; v, do: [B, T, HV, V]; gc, beta: [B, T, HV] float32 (chunk
        cumsum of the activated g, activated beta); initial_state, dht: [N, HV, K, V] float32
        or None; q_rstd, k_rstd: [B, T, H] float32 when the l2-norm option is on.
        g: [B, T, HV] float32, the activated per-token log decay whose chunk cumsum is gc.
        Optional, but needed for fp32-accurate dg under strong decay: without it the pair
        decays come from differences of gc, whose rounding (~ulp(|gc|), 1e-4 at gc = -1400)
        turns into a relative error of the same size in the decays that carry dg.
    Returns:
        dq, dk (q's dtype), dv (v's dtype), dg, dbeta ([B, T, HV] float32), dh0 (float32 or
        None without initial_state).
    split_group: with G = HV // H > 1, run the gradient launches per value head and sum dq / dk
        over the group afterwards (two transient [B, T, HV, K] buffers in q's dtype) instead of
        looping over the group inside one program per key head. None: SPLIT_GROUP.
    tm: the forward's Tm = (I + A)^-1 per chunk ([B, T, HV, 64] in v's dtype, row t holding
        its chunk's row), saved by the forward: the prep launch then reads it instead of
        forming k k^T and inverting again. None: formed here.
    states: (h, v_new) as the forward's state pass computed them (h [NT, HV, K, V] in k's
        dtype, v_new like v), kept by the forward: the prep launch then stores no u and the
        state pass (2.) is skipped. None: recomputed here.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dev = q.device

    # 1. Tm (unless the forward saved it), w, u, dv_local
    has_tm = tm is not None
    if not has_tm:
        tm = torch.empty(B, T, HV, 64, dtype=v.dtype, device=dev)
    w = torch.empty(B, T, HV, K, dtype=k.dtype, device=dev)
    store_u = states is None
    u = torch.empty(B, T, HV, V, dtype=v.dtype, device=dev) if store_u else None
    dv_buf = torch.empty(B, T, HV, V, dtype=v.dtype, device=dev)
    launch_prep(q, k, v, g, gc, beta, q_rstd, k_rstd, do, tm, w, u, dv_buf, scale, layout,
                has_tm)

    # 2. states entering each chunk and v_new (the forward's state pass, unless it kept them)
    # and 3. the reverse state pass (dv_local -> dv_new in dv_buf)
    dh = torch.empty(layout.num_chunks, HV, K, V, dtype=k.dtype, device=dev)
    dh0 = torch.empty_like(initial_state) if initial_state is not None else None
    if states is None:
        h, v_new = launch_state_and_dh(q, k, w, u, gc, q_rstd, k_rstd, do, dv_buf, dht, dh, dh0,
                                       initial_state, scale, layout, g)
        del u
    else:
        h, v_new = states
        launch_dh(q, k, w, gc, q_rstd, k_rstd, do, dv_buf, dht, dh, dh0, scale, layout, g)
    del w

    # 4. gradients
    G = HV // H
    split = SPLIT_GROUP if split_group is None else split_group
    loop_g = 1 if split else G
    dq, dk, dv, dg, dbeta = launch_grads(
        q, k, v, g, gc, beta, q_rstd, k_rstd, tm, h, dh, v_new, dv_buf,
        do, scale, layout, loop_g)
    if loop_g != G:
        # per value head -> per key head (value head i reads key head i // G), both in one
        # launch (group_sum: fp32 sums rounded once to the inputs' dtype)
        dq, dk = group_sum(dq, dk, G)
    return dq, dk, dv, dg, dbeta, dh0
