"""Forward kernels of the chunked gated delta rule (chunk BT = 64), see chunk.py for the plan.

Legend: B batch, T tokens per batch row, H key heads, HV value heads, G = HV // H,
K key dim, V value dim, N sequences, NT chunks over all sequences.
Per chunk (rows i, j in 0..63), gc = inclusive chunk-local cumsum of the log decay:
    A[i, j] = beta_i (k_i . k_j) exp(gc_i - gc_j), j < i;   Tm = (I + A)^-1
    w = Tm (beta e^gc k),   u = Tm (beta v)
    v_new = u - w h;   h <- e^{gc_last} h + (k e^{gc_last - gc})^T v_new
    o = scale ((q e^gc) h + (M (q k^T)) v_new),   M[i, j] = exp(gc_i - gc_j), j <= i
The 64x64 inverse is built from 16x16 blocks: diagonal blocks by forward substitution, the
off-diagonal ones by block products, so nothing is sliced out of a register tile.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils.triton_helpers import (
    INTERPRET,
    chunk_bounds,
    pick_configs,
    sequence_bounds,
    softplus,
)

BT = 64


@dataclass
class ChunkLayout:
    """Chunks of all sequences. Without cu_seqlens: B rows of T tokens, chunks_per_seq each.
    With cu_seqlens (B == 1): chunk_indices [NT, 2] int32 (sequence, chunk in sequence) and
    chunk_offsets [N + 1] int32 (first global chunk of each sequence), on the inputs' device."""

    batch: int
    seqlen: int
    num_seqs: int
    num_chunks: int
    chunks_per_seq: int
    cu_seqlens: Optional[torch.Tensor] = None
    chunk_indices: Optional[torch.Tensor] = None
    chunk_offsets: Optional[torch.Tensor] = None

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens is not None

    def kernel_args(self):
        """(cu_seqlens, chunk_indices, chunk_offsets, T, NT_SEQ, IS_VARLEN) for the kernels;
        the three tensors are placeholders without cu_seqlens (never read then)."""
        return (self.cu_seqlens, self.chunk_indices, self.chunk_offsets, self.seqlen,
                self.chunks_per_seq, self.is_varlen)


_LAYOUT_CACHE = {}


def make_chunk_layout(cu_seqlens: Optional[torch.Tensor], batch: int, seqlen: int) -> ChunkLayout:
    if cu_seqlens is None:
        nts = triton.cdiv(seqlen, BT)
        return ChunkLayout(batch, seqlen, batch, batch * nts, nts)
    bounds = tuple(int(x) for x in cu_seqlens.detach().cpu().tolist())
    key = (bounds, cu_seqlens.device)
    cached = _LAYOUT_CACHE.get(key)
    if cached is not None:
        return cached
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    counts = [triton.cdiv(n, BT) for n in lengths]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    table = [(n, c) for n, cnt in enumerate(counts) for c in range(cnt)]
    device = cu_seqlens.device
    layout = ChunkLayout(
        batch, seqlen, len(lengths), offsets[-1], 0,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
        chunk_indices=torch.tensor(table if table else [(0, 0)], dtype=torch.int32,
                                   device=device).reshape(-1, 2),
        chunk_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
    )
    if len(_LAYOUT_CACHE) > 64:
        _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[key] = layout
    return layout


# ---------------------------------------------------------------------------------------------
# 1. prepare: gate, cumsum, beta, l2-norm statistics of k, Tm = (I + A)^-1, w, u
# ---------------------------------------------------------------------------------------------

@triton.jit
def _diag_inverses(a0, a1, a2, a3):
    """(I + a)^-1 of four strictly lower triangular [16, 16] tiles, by forward substitution
    in one loop (four independent chains per step): row i of n = T - I is
    -a_i - sum_j a_ij n_j over the rows j < i already done; rows >= i of n still hold -a."""
    rows = tl.arange(0, 16)
    n0 = -a0
    n1 = -a1
    n2 = -a2
    n3 = -a3
    for i in range(2, 16):
        sel = rows[:, None] == i
        x0 = tl.sum(tl.where(sel, n0, 0.0), 0)
        x1 = tl.sum(tl.where(sel, n1, 0.0), 0)
        x2 = tl.sum(tl.where(sel, n2, 0.0), 0)
        x3 = tl.sum(tl.where(sel, n3, 0.0), 0)
        n0 = tl.where(sel, (x0 + tl.sum(x0[:, None] * n0, 0))[None, :], n0)
        n1 = tl.where(sel, (x1 + tl.sum(x1[:, None] * n1, 0))[None, :], n1)
        n2 = tl.where(sel, (x2 + tl.sum(x2[:, None] * n2, 0))[None, :], n2)
        n3 = tl.where(sel, (x3 + tl.sum(x3[:, None] * n3, 0))[None, :], n3)
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    return n0 + eye, n1 + eye, n2 + eye, n3 + eye


@triton.jit
def _gate_block(g_ptr, b_ptr, a_log_ptr, dt_bias_ptr, gc_ptr, beta_out_ptr, t_rows, m_rows,
                i_hv, HV: tl.constexpr, carry, GATE_MODE: tl.constexpr,
                BETA_SIGMOID: tl.constexpr, HAS_DT_BIAS: tl.constexpr, STORE: tl.constexpr):
    """One 16-row block of (gc, beta). GATE_MODE 0: g is the log decay; 1: g is the raw gate
    input a (g = -exp(A_log) softplus(a + dt_bias)); 2: g already holds gc (recompute)."""
    offs = t_rows * HV + i_hv
    b_g = tl.load(g_ptr + offs, mask=m_rows, other=0.0).to(tl.float32)
    if GATE_MODE == 2:
        b_gc = b_g
    else:
        if GATE_MODE == 1:
            x = b_g
            if HAS_DT_BIAS:
                x = x + tl.load(dt_bias_ptr + i_hv).to(tl.float32)
            b_g = -tl.exp(tl.load(a_log_ptr + i_hv).to(tl.float32)) * softplus(x)
            b_g = tl.where(m_rows, b_g, 0.0)
        b_gc = tl.cumsum(b_g, 0) + carry
    b_beta = tl.load(b_ptr + offs, mask=m_rows, other=0.0).to(tl.float32)
    if BETA_SIGMOID:
        b_beta = tl.sigmoid(b_beta)
    if STORE:
        tl.store(gc_ptr + offs, b_gc, mask=m_rows)
        tl.store(beta_out_ptr + offs, b_beta, mask=m_rows)
    return b_gc, b_beta


@triton.jit
def _scaled_block(a, gc_i, gc_j, beta_i, DIAG: tl.constexpr):
    """beta_i a_ij exp(gc_i - gc_j), strictly lower part only for a diagonal block."""
    d = gc_i[:, None] - gc_j[None, :]
    if DIAG:
        rows = tl.arange(0, 16)
        keep = rows[:, None] > rows[None, :]
        return tl.where(keep, a * tl.exp(tl.where(keep, d, 0.0)) * beta_i[:, None], 0.0)
    return a * tl.exp(d) * beta_i[:, None]


@triton.jit
def _wy_rhs_store(x_ptr, out_ptr, t0, eos, stride_x, stride_o, col0, NCOL, scale0, scale1,
                  scale2, scale3, t00, t10, t11, t20, t21, t22, t30, t31, t32, t33,
                  BC: tl.constexpr):
    """out rows = Tm @ (scale * x) for one [64, BC] column block, in four 16-row blocks."""
    r = tl.arange(0, 16)
    cols = col0 + tl.arange(0, BC)
    m_c = cols < NCOL
    t_r0 = t0 + r
    t_r1 = t0 + 16 + r
    t_r2 = t0 + 32 + r
    t_r3 = t0 + 48 + r
    m0 = (t_r0 < eos)[:, None] & m_c[None, :]
    m1 = (t_r1 < eos)[:, None] & m_c[None, :]
    m2 = (t_r2 < eos)[:, None] & m_c[None, :]
    m3 = (t_r3 < eos)[:, None] & m_c[None, :]
    x0 = tl.load(x_ptr + t_r0[:, None] * stride_x + cols[None, :], mask=m0, other=0.0).to(tl.float32) * scale0[:, None]
    x1 = tl.load(x_ptr + t_r1[:, None] * stride_x + cols[None, :], mask=m1, other=0.0).to(tl.float32) * scale1[:, None]
    x2 = tl.load(x_ptr + t_r2[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32) * scale2[:, None]
    x3 = tl.load(x_ptr + t_r3[:, None] * stride_x + cols[None, :], mask=m3, other=0.0).to(tl.float32) * scale3[:, None]
    y0 = tl.dot(t00, x0)
    y1 = tl.dot(t10, x0) + tl.dot(t11, x1)
    y2 = tl.dot(t20, x0) + tl.dot(t21, x1) + tl.dot(t22, x2)
    y3 = tl.dot(t30, x0) + tl.dot(t31, x1) + tl.dot(t32, x2) + tl.dot(t33, x3)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + t_r0[:, None] * stride_o + cols[None, :], y0.to(ty), mask=m0)
    tl.store(out_ptr + t_r1[:, None] * stride_o + cols[None, :], y1.to(ty), mask=m1)
    tl.store(out_ptr + t_r2[:, None] * stride_o + cols[None, :], y2.to(ty), mask=m2)
    tl.store(out_ptr + t_r3[:, None] * stride_o + cols[None, :], y3.to(ty), mask=m3)


@triton.autotune(
    configs=pick_configs(
        [triton.Config({}, num_warps=w, num_stages=2) for w in (4, 8)],
        triton.Config({}, num_warps=4, num_stages=1),
    ),
    key=["H", "HV", "K", "V", "GATE_MODE", "L2", "IS_VARLEN"],
)
@triton.jit
def _prepare_kernel(
    k, v, g, beta, a_log, dt_bias, gc, beta_out, k_rstd, w, u,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    GATE_MODE: tl.constexpr, BETA_SIGMOID: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    L2: tl.constexpr, STORE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = HV // H
    _, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, 64, IS_VARLEN)
    r = tl.arange(0, 16)
    t_r0 = t0 + r
    t_r1 = t0 + 16 + r
    t_r2 = t0 + 32 + r
    t_r3 = t0 + 48 + r
    m_r0 = t_r0 < eos
    m_r1 = t_r1 < eos
    m_r2 = t_r2 < eos
    m_r3 = t_r3 < eos

    # K K^T of the chunk in 16x16 blocks (shared by the G value heads of this key head)
    a10 = tl.zeros([16, 16], dtype=tl.float32)
    a11 = tl.zeros([16, 16], dtype=tl.float32)
    a20 = tl.zeros([16, 16], dtype=tl.float32)
    a21 = tl.zeros([16, 16], dtype=tl.float32)
    a22 = tl.zeros([16, 16], dtype=tl.float32)
    a30 = tl.zeros([16, 16], dtype=tl.float32)
    a31 = tl.zeros([16, 16], dtype=tl.float32)
    a32 = tl.zeros([16, 16], dtype=tl.float32)
    a33 = tl.zeros([16, 16], dtype=tl.float32)
    a00 = tl.zeros([16, 16], dtype=tl.float32)
    s0 = tl.zeros([16], dtype=tl.float32)
    s1 = tl.zeros([16], dtype=tl.float32)
    s2 = tl.zeros([16], dtype=tl.float32)
    s3 = tl.zeros([16], dtype=tl.float32)
    k_h = k + i_h * K
    for i_k in range(0, tl.cdiv(K, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        m_c = cols < K
        k0 = tl.load(k_h + t_r0[:, None] * (H * K) + cols[None, :], mask=m_r0[:, None] & m_c[None, :], other=0.0)
        k1 = tl.load(k_h + t_r1[:, None] * (H * K) + cols[None, :], mask=m_r1[:, None] & m_c[None, :], other=0.0)
        k2 = tl.load(k_h + t_r2[:, None] * (H * K) + cols[None, :], mask=m_r2[:, None] & m_c[None, :], other=0.0)
        k3 = tl.load(k_h + t_r3[:, None] * (H * K) + cols[None, :], mask=m_r3[:, None] & m_c[None, :], other=0.0)
        a00 += tl.dot(k0, tl.trans(k0))
        a10 += tl.dot(k1, tl.trans(k0))
        a11 += tl.dot(k1, tl.trans(k1))
        a20 += tl.dot(k2, tl.trans(k0))
        a21 += tl.dot(k2, tl.trans(k1))
        a22 += tl.dot(k2, tl.trans(k2))
        a30 += tl.dot(k3, tl.trans(k0))
        a31 += tl.dot(k3, tl.trans(k1))
        a32 += tl.dot(k3, tl.trans(k2))
        a33 += tl.dot(k3, tl.trans(k3))
        if L2:
            s0 += tl.sum(k0.to(tl.float32) * k0.to(tl.float32), 1)
            s1 += tl.sum(k1.to(tl.float32) * k1.to(tl.float32), 1)
            s2 += tl.sum(k2.to(tl.float32) * k2.to(tl.float32), 1)
            s3 += tl.sum(k3.to(tl.float32) * k3.to(tl.float32), 1)
    if L2:
        r0 = tl.rsqrt(s0 + 1e-6)
        r1 = tl.rsqrt(s1 + 1e-6)
        r2 = tl.rsqrt(s2 + 1e-6)
        r3 = tl.rsqrt(s3 + 1e-6)
        if STORE:
            tl.store(k_rstd + t_r0 * H + i_h, r0, mask=m_r0)
            tl.store(k_rstd + t_r1 * H + i_h, r1, mask=m_r1)
            tl.store(k_rstd + t_r2 * H + i_h, r2, mask=m_r2)
            tl.store(k_rstd + t_r3 * H + i_h, r3, mask=m_r3)
        a00 = a00 * r0[:, None] * r0[None, :]
        a10 = a10 * r1[:, None] * r0[None, :]
        a11 = a11 * r1[:, None] * r1[None, :]
        a20 = a20 * r2[:, None] * r0[None, :]
        a21 = a21 * r2[:, None] * r1[None, :]
        a22 = a22 * r2[:, None] * r2[None, :]
        a30 = a30 * r3[:, None] * r0[None, :]
        a31 = a31 * r3[:, None] * r1[None, :]
        a32 = a32 * r3[:, None] * r2[None, :]
        a33 = a33 * r3[:, None] * r3[None, :]
    else:
        r0 = tl.full([16], 1.0, dtype=tl.float32)
        r1 = r0
        r2 = r0
        r3 = r0

    for i_g in range(0, G):
        i_hv = i_h * G + i_g
        gc0, b0 = _gate_block(g, beta, a_log, dt_bias, gc, beta_out, t_r0, m_r0, i_hv, HV, 0.0,
                              GATE_MODE, BETA_SIGMOID, HAS_DT_BIAS, STORE)
        gc1, b1 = _gate_block(g, beta, a_log, dt_bias, gc, beta_out, t_r1, m_r1, i_hv, HV,
                              tl.sum(tl.where(r == 15, gc0, 0.0), 0),
                              GATE_MODE, BETA_SIGMOID, HAS_DT_BIAS, STORE)
        gc2, b2 = _gate_block(g, beta, a_log, dt_bias, gc, beta_out, t_r2, m_r2, i_hv, HV,
                              tl.sum(tl.where(r == 15, gc1, 0.0), 0),
                              GATE_MODE, BETA_SIGMOID, HAS_DT_BIAS, STORE)
        gc3, b3 = _gate_block(g, beta, a_log, dt_bias, gc, beta_out, t_r3, m_r3, i_hv, HV,
                              tl.sum(tl.where(r == 15, gc2, 0.0), 0),
                              GATE_MODE, BETA_SIGMOID, HAS_DT_BIAS, STORE)
        # Tm = (I + A)^-1 block by block: T_ii = (I + A_ii)^-1,
        # T_ij = -T_ii sum_{j <= l < i} A_il T_lj
        t00, t11, t22, t33 = _diag_inverses(
            _scaled_block(a00, gc0, gc0, b0, True), _scaled_block(a11, gc1, gc1, b1, True),
            _scaled_block(a22, gc2, gc2, b2, True), _scaled_block(a33, gc3, gc3, b3, True))
        l10 = _scaled_block(a10, gc1, gc0, b1, False)
        l20 = _scaled_block(a20, gc2, gc0, b2, False)
        l21 = _scaled_block(a21, gc2, gc1, b2, False)
        l30 = _scaled_block(a30, gc3, gc0, b3, False)
        l31 = _scaled_block(a31, gc3, gc1, b3, False)
        l32 = _scaled_block(a32, gc3, gc2, b3, False)
        t10 = -tl.dot(t11, tl.dot(l10, t00))
        t21 = -tl.dot(t22, tl.dot(l21, t11))
        t32 = -tl.dot(t33, tl.dot(l32, t22))
        t20 = -tl.dot(t22, tl.dot(l20, t00) + tl.dot(l21, t10))
        t31 = -tl.dot(t33, tl.dot(l31, t11) + tl.dot(l32, t21))
        t30 = -tl.dot(t33, tl.dot(l30, t00) + tl.dot(l31, t10) + tl.dot(l32, t20))

        # w = Tm (beta e^gc rstd k), u = Tm (beta v)
        for i_k in range(0, tl.cdiv(K, BK)):
            _wy_rhs_store(k_h, w + i_hv * K, t0, eos, H * K, HV * K, i_k * BK, K,
                          b0 * tl.exp(gc0) * r0, b1 * tl.exp(gc1) * r1,
                          b2 * tl.exp(gc2) * r2, b3 * tl.exp(gc3) * r3,
                          t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, BK)
        for i_v in range(0, tl.cdiv(V, BV)):
            _wy_rhs_store(v + i_hv * V, u + i_hv * V, t0, eos, HV * V, HV * V, i_v * BV, V,
                          b0, b1, b2, b3,
                          t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, BV)


def _pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _launch_prepare(k, v, g, beta, layout, gate_mode, A_log, dt_bias, use_beta_sigmoid,
                    use_qk_l2norm, store):
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    dev = k.device
    w = torch.empty(B, T, HV, K, dtype=k.dtype, device=dev)
    u = torch.empty(B, T, HV, V, dtype=v.dtype, device=dev)
    if store:
        gc = torch.empty(B, T, HV, dtype=torch.float32, device=dev)
        beta_out = torch.empty(B, T, HV, dtype=torch.float32, device=dev)
        k_rstd = torch.empty(B, T, H, dtype=torch.float32, device=dev) if use_qk_l2norm else None
    else:
        gc, beta_out, k_rstd = g, beta, None
    cu, ci, _, T_arg, nts, varlen = layout.kernel_args()
    _prepare_kernel[(layout.num_chunks, H)](
        k, v, g, beta, A_log, dt_bias, gc, beta_out, k_rstd, w, u,
        cu, ci, T_arg, nts,
        H=H, HV=HV, K=K, V=V, BK=_pow2_block(K, 64), BV=_pow2_block(V, 64),
        GATE_MODE=gate_mode, BETA_SIGMOID=use_beta_sigmoid, HAS_DT_BIAS=dt_bias is not None,
        L2=use_qk_l2norm, STORE=store, IS_VARLEN=varlen,
    )
    return gc, beta_out, k_rstd, w, u


def chunk_prepare_fwd(k, v, g, beta, layout: ChunkLayout, *, A_log=None, dt_bias=None,
                      use_beta_sigmoid=False, use_qk_l2norm=False):
    """Gate + cumsum + beta + k l2-norm statistics + WY factors in one launch.

    Returns gc [B, T, HV] f32, beta [B, T, HV] f32 (activated), k_rstd [B, T, H] f32 or None,
    w [B, T, HV, K] (k's dtype), u [B, T, HV, V] (v's dtype)."""
    return _launch_prepare(k, v, g, beta, layout, 1 if A_log is not None else 0, A_log, dt_bias,
                           use_beta_sigmoid, use_qk_l2norm, True)


def chunk_wy_fwd(k, v, gc, beta, layout: ChunkLayout, k_rstd=None):
    """Recompute w, u from the saved gc and activated beta (float32 [B, T, HV]); k_rstd not
    None means the l2-norm option is on (its statistics are recomputed in the kernel)."""
    _, _, _, w, u = _launch_prepare(k, v, gc, beta, layout, 2, None, None, False,
                                    k_rstd is not None, False)
    return w, u


# ---------------------------------------------------------------------------------------------
# 2. the sequential state pass
# ---------------------------------------------------------------------------------------------

@triton.autotune(
    configs=pick_configs(
        [triton.Config({"BV": bv}, num_warps=4, num_stages=s) for bv in (16, 32) for s in (2, 3)]
        + [triton.Config({"BV": 64}, num_warps=4, num_stages=2)],
        triton.Config({"BV": 32}, num_warps=4, num_stages=1),
    ),
    key=["H", "HV", "K", "V", "L2", "IS_VARLEN", "USE_H0", "STORE_FINAL", "PAR_CLASS"],
)
@triton.jit
def _state_kernel(
    k, w, u, gc, k_rstd, h0, h, v_new, ht,
    cu_seqlens, chunk_offsets, T, NT_SEQ, PAR_CLASS,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    L2: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
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
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + state_off + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
    for i_t in range(0, nt):
        t_r = bos + i_t * 64 + r
        m_t = t_r < eos
        h_off = ((c_off + i_t) * HV + i_hv) * K * V
        tl.store(h + h_off + o_k[:, None] * V + o_v[None, :], b_h.to(h.dtype.element_ty), mask=m_kv)
        b_w = tl.load(w + (t_r[:, None] * HV + i_hv) * K + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_u = tl.load(u + (t_r[:, None] * HV + i_hv) * V + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_h.to(b_w.dtype))
        tl.store(v_new + (t_r[:, None] * HV + i_hv) * V + o_v[None, :],
                 b_vn.to(v_new.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        b_gc = tl.load(gc + t_r * HV + i_hv, mask=m_t, other=0.0)
        t_last = tl.minimum(bos + i_t * 64 + 64, eos) - 1
        g_last = tl.load(gc + t_last * HV + i_hv)
        b_k = tl.load(k + (t_r[:, None] * H + i_h) * K + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0)
        decay = tl.where(m_t, tl.exp(g_last - b_gc), 0.0)
        if L2:
            decay = decay * tl.load(k_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        b_vn = b_vn * decay[:, None]
        b_h = b_h * tl.exp(g_last) + tl.dot(tl.trans(b_k), b_vn.to(b_k.dtype))
    if STORE_FINAL:
        tl.store(ht + state_off + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)


def _parallelism_class(programs_per_v_block: int) -> int:
    """Autotune bucket of the sequential pass: B = 1 with few heads wants narrow V blocks
    (more programs), large batches wide ones; a bucket, so packed batches with varying
    sequence counts do not retune every step."""
    return 0 if programs_per_v_block < 64 else (1 if programs_per_v_block < 256 else 2)


def chunk_state_fwd(k, w, u, gc, layout: ChunkLayout, initial_state=None,
                    output_final_state=False, k_rstd=None):
    """Sequential pass over the chunks of each sequence.

    Returns h [NT, HV, K, V] in k's dtype (the state entering each chunk), v_new [B, T, HV, V]
    in u's dtype, final_state [N, HV, K, V] float32 or None."""
    B, T, H, K = k.shape
    HV, V = u.shape[2], u.shape[3]
    dev = k.device
    h = torch.empty(layout.num_chunks, HV, K, V, dtype=k.dtype, device=dev)
    v_new = torch.empty_like(u)
    ht = torch.empty(layout.num_seqs, HV, K, V, dtype=torch.float32, device=dev) if output_final_state else None
    cu, _, co, T_arg, nts, varlen = layout.kernel_args()

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), layout.num_seqs, HV)

    _state_kernel[grid](
        k, w, u, gc, k_rstd, initial_state, h, v_new, ht,
        cu, co, T_arg, nts, _parallelism_class(layout.num_seqs * HV),
        H=H, HV=HV, K=K, V=V, BK=_pow2_block(K, 256),
        L2=k_rstd is not None, USE_H0=initial_state is not None,
        STORE_FINAL=output_final_state, IS_VARLEN=varlen,
    )
    return h, v_new, ht


# ---------------------------------------------------------------------------------------------
# 3. the output, parallel over chunks
# ---------------------------------------------------------------------------------------------

@triton.autotune(
    configs=pick_configs(
        [triton.Config({"BV": 64}, num_warps=4, num_stages=2),
         triton.Config({"BV": 128}, num_warps=8, num_stages=2)],
        triton.Config({"BV": 64}, num_warps=4, num_stages=1),
    ),
    key=["H", "HV", "K", "V", "L2", "IS_VARLEN"],
)
@triton.jit
def _output_kernel(
    q, k, v_new, h, gc, k_rstd, q_rstd, o, scale,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = HV // H
    i_h = i_hv // G
    _, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, 64, IS_VARLEN)
    r = tl.arange(0, 64)
    t_r = t0 + r
    m_t = t_r < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    h_base = h + (i_c.to(tl.int64) * HV + i_hv) * K * V
    acc_o = tl.zeros([64, BV], dtype=tl.float32)
    acc_s = tl.zeros([64, 64], dtype=tl.float32)
    sq = tl.zeros([64], dtype=tl.float32)
    # BK covers all of K (one step): with BK = 64 < K = 128 this loop compiled wrong for bf16
    # on H200 with triton 3.6 (o off by 7e-2; fp32 and the interpreter were right)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + (t_r[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        # k^T loaded transposed ([BK, 64]) rather than tl.trans of a [64, BK] tile
        b_kt = tl.load(k + (t_r[None, :] * H + i_h) * K + o_k[:, None],
                       mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_h = tl.load(h_base + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                      other=0.0)
        acc_o += tl.dot(b_q, b_h.to(b_q.dtype))
        acc_s += tl.dot(b_q, b_kt)
        if L2:
            sq += tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), 1)
    b_gc = tl.load(gc + t_r * HV + i_hv, mask=m_t, other=0.0)
    acc_o = acc_o * tl.exp(b_gc)[:, None]
    row_scale = tl.full([64], scale, dtype=tl.float32)
    if L2:
        rq = tl.rsqrt(sq + 1e-6)
        if i_v == 0:
            if i_hv % G == 0:
                tl.store(q_rstd + t_r * H + i_h, rq, mask=m_t)
        rk = tl.load(k_rstd + t_r * H + i_h, mask=m_t, other=0.0)
        row_scale = row_scale * rq
        acc_s = acc_s * rk[None, :]
    causal = (r[:, None] >= r[None, :]) & m_t[:, None] & m_t[None, :]
    d = tl.where(causal, b_gc[:, None] - b_gc[None, :], 0.0)
    acc_s = tl.where(causal, acc_s * tl.exp(d), 0.0)
    b_vn = tl.load(v_new + (t_r[:, None] * HV + i_hv) * V + o_v[None, :],
                   mask=m_t[:, None] & m_v[None, :], other=0.0)
    acc = (acc_o + tl.dot(acc_s.to(b_vn.dtype), b_vn)) * row_scale[:, None]
    tl.store(o + (t_r[:, None] * HV + i_hv) * V + o_v[None, :], acc.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


def chunk_output_fwd(q, k, v_new, h, gc, scale, layout: ChunkLayout, k_rstd=None,
                     use_qk_l2norm=False, config=None):
    """o [B, T, HV, V] in v_new's dtype, and q_rstd [B, T, H] float32 (None without l2-norm).
    config: a triton.Config to run instead of autotuning (benchmark diagnostics)."""
    B, T, H, K = q.shape
    HV, V = v_new.shape[2], v_new.shape[3]
    o = torch.empty_like(v_new)
    q_rstd = torch.empty(B, T, H, dtype=torch.float32, device=q.device) if use_qk_l2norm else None
    cu, ci, _, T_arg, nts, varlen = layout.kernel_args()

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), layout.num_chunks, HV)

    kernel, extra = _output_kernel, {}
    if config is not None:
        kernel = _output_kernel.fn
        extra = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    kernel[grid if config is None else grid(extra)](
        q, k, v_new, h, gc, k_rstd, q_rstd, o, scale,
        cu, ci, T_arg, nts,
        H=H, HV=HV, K=K, V=V, BK=_pow2_block(K, 256), L2=use_qk_l2norm, IS_VARLEN=varlen,
        **extra,
    )
    return o, q_rstd
