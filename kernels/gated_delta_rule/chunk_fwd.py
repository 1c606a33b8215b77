"""Forward kernels of the chunked gated delta rule (chunk BT = 64), see chunk.py for the plan.

Legend: B batch, T tokens per batch row, H key heads, HV value heads, G = HV // H,
K key dim, V value dim, N sequences, NT chunks over all sequences.
Per chunk (rows i, j in 0..63), gc = inclusive chunk-local cumsum of the log decay:
    A[i, j] = beta_i (k_i . k_j) exp(gc_i - gc_j), j < i;   Tm = (I + A)^-1
    w = Tm (beta e^gc k),   u = Tm (beta v)
    v_new = u - w h;   h <- e^{gc_last} h + (k e^{gc_last - gc})^T v_new
    o = scale ((q e^gc) h + (M (q k^T)) v_new),   M[i, j] = exp(gc_i - gc_j), j <= i
The 64x64 inverse: the four diagonal 16x16 blocks by forward substitution (one [4, 16, 16]
tile), the rest by the terminating series (I - Z + Z^2 - Z^3) D^-1 (four 64x64 dots).
The prepare kernel runs per (chunk, value head); its substitution keeps one reduction on its
dependency chain and its Tm @ x dots take bf16 / fp16 operands for half inputs (sm_90a: 150
registers, three blocks per SM; the per-key-head kernel it replaced took 207 and twice the
time on H200).
Hopper + triton 3.6: a dot accumulated over a two-step K loop (BK = 64 < K = 128) came out
wrong in bf16 in the output kernel, so the kernels take all of K (<= 256) in one tile.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..utils.triton_helpers import (
    chunk_bounds,
    sequence_bounds,
    softplus,
)
from ..utils.tuning import autotune_or_fixed, by_parallelism

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
def _unit_lower_inverse(a):
    """(I + a)^-1 for a strictly lower triangular [64, 64] tile.

    With D = I + (the 16x16 diagonal blocks of a) and N the rest of a, I + a = D (I + Z),
    Z = D^-1 N strictly block lower, so Z^4 = 0 and (I + a)^-1 = (I - Z + Z^2 - Z^3) D^-1.
    D^-1: forward substitution on the four diagonal blocks at once as a [4, 16, 16] tile.
    Row i of n = D^-1 - I is n_i - sum_j d_ij n_j (n_i still holds -d_i). The weights d_ij
    are taken from d^T as column i (a reduction along the columns, independent of n), so the
    only reduction on the dependency chain is the one over the rows j of n, and its result
    already has the layout of a row of n (no layout change inside the loop)."""
    bi = tl.arange(0, 4)[:, None, None, None]
    bj = tl.arange(0, 4)[None, None, :, None]
    blocks = tl.reshape(a, [4, 16, 4, 16])
    d = tl.sum(tl.where(bi == bj, blocks, 0.0), 2)
    d_t = tl.permute(d, (0, 2, 1))
    rows = tl.arange(0, 16)[None, :, None]
    cols = tl.arange(0, 16)[None, None, :]
    n = -d
    # d_t + 0 * n: d_t in the layout of n, converted once here rather than in every step
    d_t = d_t + 0.0 * n
    for i in range(2, 16):
        c = tl.sum(tl.where(cols == i, d_t, 0.0), 2)
        n = n - tl.where(rows == i, tl.sum(c[:, :, None] * n, 1)[:, None, :], 0.0)
    n = n + (rows == cols).to(tl.float32)
    d_inv = tl.reshape(tl.where(bi == bj, n[:, :, None, :], 0.0), [64, 64])
    r = tl.arange(0, 64)
    z = tl.dot(d_inv, tl.where((r // 16)[:, None] > (r // 16)[None, :], a, 0.0))
    # I - Z + Z^2 - Z^3 by Horner, I - Z (I - Z (I - Z)), each step one dot accumulating onto
    # I: fewer 64 x 64 float32 tiles live at once than with Z^2 and Z^3 side by side
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    p = tl.dot(-z, tl.dot(-z, eye - z, eye), eye)
    return tl.dot(p, d_inv)


@triton.jit
def _store_tm_rhs(tm, x_ptr, out_ptr, t_r, m_t, stride_x, stride_o, row_scale, NCOL,
                  BC: tl.constexpr, HALF_DOTS: tl.constexpr):
    """out = Tm @ (row_scale * x) over column blocks of BC. HALF_DOTS (x in bf16 / fp16): Tm
    and the scaled x rounded to x's dtype, float32 accumulation (half the operand bytes and
    twice the MMA rate of tf32); otherwise float32 operands."""
    if HALF_DOTS:
        tm = tm.to(x_ptr.dtype.element_ty)
    for i_c in range(0, tl.cdiv(NCOL, BC)):
        cols = i_c * BC + tl.arange(0, BC)
        m = m_t[:, None] & (cols < NCOL)[None, :]
        b_x = tl.load(x_ptr + t_r[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        b_xs = b_x.to(tl.float32) * row_scale[:, None]
        if HALF_DOTS:
            b_xs = b_xs.to(x_ptr.dtype.element_ty)
        b_y = tl.dot(tm, b_xs)
        tl.store(out_ptr + t_r[:, None] * stride_o + cols[None, :],
                 b_y.to(out_ptr.dtype.element_ty), mask=m)


# one config: 4 warps / 2 stages (H200, run 6: 0.19 / 0.38 / 0.38 ms at S1 / S2 / S3, against
# 0.34 / 0.66 / 0.65 for the per-key-head kernel it replaced)
@autotune_or_fixed(
    configs=[triton.Config({}, num_warps=4, num_stages=2)],
    interpret_config=triton.Config({}, num_warps=4, num_stages=1),
    key=["H", "HV", "K", "V", "GATE_MODE", "L2", "IS_VARLEN", "HALF_DOTS"],
)
@triton.jit
def _prepare_kernel(
    k, v, g, beta, a_log, dt_bias, gc, beta_out, k_rstd, w, u, tm,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BKF: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_MODE: tl.constexpr, BETA_SIGMOID: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    L2: tl.constexpr, STORE: tl.constexpr, IS_VARLEN: tl.constexpr, HALF_DOTS: tl.constexpr,
    STORE_TM: tl.constexpr,
):
    """Per (chunk, value head): gate activation and chunk cumsum, beta, A, Tm = (I + A)^-1,
    w and u (and Tm itself with STORE_TM). G times the programs under GVA, each recomputing
    K K^T of its key head (64 x 64 x K, cheap next to the inverse); the key head's first value
    head stores k_rstd. GATE_MODE 0: g is the log decay; 1: g is the raw gate input a
    (g = -exp(A_log) softplus(a + dt_bias)); 2: g already holds gc (recompute, STORE off)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = HV // H
    i_h = i_hv // G
    _, bos, eos, t0 = chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, 64, IS_VARLEN)
    r = tl.arange(0, 64)
    t_r = t0 + r
    m_t = t_r < eos
    o_k = tl.arange(0, BKF)
    k_h = k + i_h * K
    b_k = tl.load(k_h + t_r[:, None] * (H * K) + o_k[None, :],
                  mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
    b_kk = tl.dot(b_k, tl.trans(b_k))
    if L2:
        rk = tl.rsqrt(tl.sum(b_k.to(tl.float32) * b_k.to(tl.float32), 1) + 1e-6)
        if STORE:
            if i_hv % G == 0:
                tl.store(k_rstd + t_r * H + i_h, rk, mask=m_t)
        b_kk = b_kk * rk[:, None] * rk[None, :]
    else:
        rk = tl.full([64], 1.0, dtype=tl.float32)
    lower = (r[:, None] > r[None, :]) & m_t[:, None] & m_t[None, :]
    offs = t_r * HV + i_hv
    b_g = tl.load(g + offs, mask=m_t, other=0.0).to(tl.float32)
    if GATE_MODE == 2:
        b_gc = b_g
    else:
        if GATE_MODE == 1:
            x = b_g
            if HAS_DT_BIAS:
                x = x + tl.load(dt_bias + i_hv).to(tl.float32)
            b_g = tl.where(m_t, -tl.exp(tl.load(a_log + i_hv).to(tl.float32)) * softplus(x), 0.0)
        b_gc = tl.cumsum(b_g, 0)
    b_beta = tl.load(beta + offs, mask=m_t, other=0.0).to(tl.float32)
    if BETA_SIGMOID:
        b_beta = tl.sigmoid(b_beta)
    if STORE:
        tl.store(gc + offs, b_gc, mask=m_t)
        tl.store(beta_out + offs, b_beta, mask=m_t)
    # the decay exponent is <= 0 below the diagonal; masked first so nothing overflows
    b_a = tl.where(lower, b_kk * b_beta[:, None]
                   * tl.exp(tl.where(lower, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0)
    b_tm = _unit_lower_inverse(b_a)
    if HALF_DOTS:
        # one conversion for the dots and the stored copy (tm has v's dtype, = k's here)
        b_tm = b_tm.to(k.dtype.element_ty)
    # w = Tm (beta e^gc rstd k), u = Tm (beta v)
    _store_tm_rhs(b_tm, k_h, w + i_hv * K, t_r, m_t, H * K, HV * K,
                  b_beta * tl.exp(b_gc) * rk, K, BK, HALF_DOTS)
    _store_tm_rhs(b_tm, v + i_hv * V, u + i_hv * V, t_r, m_t, HV * V, HV * V, b_beta, V,
                  BV, HALF_DOTS)
    if STORE_TM:
        # a block pointer: the [64, 64] tile's per-element addresses cost ~34 registers
        # (sm_90a, bf16, K = V = 128: 184 against 150), a third block per SM
        # offsets must be 32-bit (Triton 3.6 asserts): the 64-bit chunk start goes into the
        # base, the tile starts at (0, 0) of what is left of the sequence
        p_tm = tl.make_block_ptr(tm + t0 * (HV * 64) + i_hv * 64, (eos - t0, 64), (HV * 64, 1),
                                 (0, 0), (64, 64), (1, 0))
        tl.store(p_tm, b_tm.to(tm.dtype.element_ty), boundary_check=(0,))


def _pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _launch_prepare(k, v, g, beta, layout, gate_mode, A_log, dt_bias, use_beta_sigmoid,
                    use_qk_l2norm, store, tm_out=None):
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
    flags = dict(GATE_MODE=gate_mode, BETA_SIGMOID=use_beta_sigmoid,
                 HAS_DT_BIAS=dt_bias is not None, L2=use_qk_l2norm, STORE=store,
                 IS_VARLEN=varlen, STORE_TM=tm_out is not None)
    args = (k, v, g, beta, A_log, dt_bias, gc, beta_out, k_rstd, w, u, tm_out,
            cu, ci, T_arg, nts)
    # half dots only when both right-hand sides are half (fp32 inputs keep fp32 dots); then a
    # column block spans all of a dim up to 128, else 64 (sm_90a bf16, ptxas: 150 registers at
    # K = V = 128, 164 at K = 256 / V = 512, three blocks per SM; 64-wide blocks at K = V = 128
    # take 154, a 128-wide block at 256 / 512 takes 236)
    half = k.dtype in (torch.bfloat16, torch.float16) and v.dtype == k.dtype
    BK = _pow2_block(K, 128) if half and K <= 128 else _pow2_block(K, 64)
    BV = _pow2_block(V, 128) if half and V <= 128 else _pow2_block(V, 64)
    _prepare_kernel[(layout.num_chunks, HV)](
        *args, H=H, HV=HV, K=K, V=V, BKF=_pow2_block(K, 256), BK=BK, BV=BV,
        HALF_DOTS=half, **flags)
    return gc, beta_out, k_rstd, w, u


def chunk_prepare_fwd(k, v, g, beta, layout: ChunkLayout, *, A_log=None, dt_bias=None,
                      use_beta_sigmoid=False, use_qk_l2norm=False, tm_out=None):
    """Gate + cumsum + beta + k l2-norm statistics + WY factors in one launch.

    Returns gc [B, T, HV] f32, beta [B, T, HV] f32 (activated), k_rstd [B, T, H] f32 or None,
    w [B, T, HV, K] (k's dtype), u [B, T, HV, V] (v's dtype). tm_out ([B, T, HV, 64], v's
    dtype, or None): filled with each chunk's Tm = (I + A)^-1 for the backward."""
    return _launch_prepare(k, v, g, beta, layout, 1 if A_log is not None else 0, A_log, dt_bias,
                           use_beta_sigmoid, use_qk_l2norm, True, tm_out)


def chunk_wy_fwd(k, v, gc, beta, layout: ChunkLayout, k_rstd=None):
    """Recompute w, u from the saved gc and activated beta (float32 [B, T, HV]); k_rstd not
    None means the l2-norm option is on (its statistics are recomputed in the kernel)."""
    _, _, _, w, u = _launch_prepare(k, v, gc, beta, layout, 2, None, None, False,
                                    k_rstd is not None, False)
    return w, u


# ---------------------------------------------------------------------------------------------
# 2. the sequential state pass
# ---------------------------------------------------------------------------------------------

def _state_shared_bytes(config, args) -> int:
    """Shared memory of one _state_kernel launch, estimated: num_stages pipelined copies of the
    w and k tiles ([64, BK]) and of the u tile ([64, BV]), plus 10% for layout conversions
    (sm_90 measured: 426,504 B at float32, K = 256, BV = 16, 3 stages; estimate 446,054)."""
    bk = args["BK"]
    e = args["k"].element_size()
    u = args["u"].element_size() if args["u"] is not None else 0
    return int(1.1 * config.num_stages * 64 * (bk * 2 * e + config.kwargs["BV"] * u))


# H200 picks: BV 16 / 3 stages at S2 (16 programs per V block), BV 32 / 3 stages at S4, BV 32
# / 2 stages at S1, S3, S5
_STATE_NARROW = [triton.Config({"BV": bv}, num_warps=4, num_stages=3) for bv in (16, 32)]
_STATE_WIDE = [triton.Config({"BV": bv}, num_warps=4, num_stages=2) for bv in (32, 64)]


@autotune_or_fixed(
    configs=_STATE_NARROW + _STATE_WIDE,
    interpret_config=triton.Config({"BV": 32}, num_warps=4, num_stages=1),
    key=["H", "HV", "K", "V", "L2", "IS_VARLEN", "USE_H0", "STORE_FINAL", "PAR_CLASS"],
    prune_configs_by=by_parallelism(_STATE_NARROW, _STATE_WIDE, _state_shared_bytes),
)
@triton.jit
def _state_kernel(
    k, w, u, gc, k_rstd, h0, h, v_new, ht,
    cu_seqlens, chunk_offsets, T, NT_SEQ, PAR_CLASS,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    L2: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_U: tl.constexpr, SAVE_STATES: tl.constexpr,
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
        if SAVE_STATES:
            h_off = ((c_off + i_t) * HV + i_hv) * K * V
            tl.store(h + h_off + o_k[:, None] * V + o_v[None, :], b_h.to(h.dtype.element_ty),
                     mask=m_kv)
        b_w = tl.load(w + (t_r[:, None] * HV + i_hv) * K + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_vn = -tl.dot(b_w, b_h.to(b_w.dtype))
        if HAS_U:
            b_vn += tl.load(u + (t_r[:, None] * HV + i_hv) * V + o_v[None, :],
                            mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        if SAVE_STATES:
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
    _launch_state(k, w, u, gc, layout, initial_state, k_rstd, h, v_new, ht, V, True)
    return h, v_new, ht


def _launch_state(k, w, u, gc, layout, initial_state, k_rstd, h, v_new, ht, V, save_states):
    H, K = k.shape[2], k.shape[3]
    HV = w.shape[2]
    cu, _, co, T_arg, nts, varlen = layout.kernel_args()

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), layout.num_seqs, HV)

    _state_kernel[grid](
        k, w, u, gc, k_rstd, initial_state, h, v_new, ht,
        cu, co, T_arg, nts, _parallelism_class(layout.num_seqs * HV),
        H=H, HV=HV, K=K, V=V, BK=_pow2_block(K, 256),
        L2=k_rstd is not None, USE_H0=initial_state is not None,
        STORE_FINAL=ht is not None, IS_VARLEN=varlen, HAS_U=u is not None,
        SAVE_STATES=save_states,
    )


def chunk_affine_summary(k, w, u, gc, layout: ChunkLayout, k_rstd=None):
    """The affine map of the state across each sequence, S_out = M S_in + H, for context
    parallelism; reuses w, u of `chunk_prepare_fwd` and stores no per-chunk states.

    M [N, HV, K, K] float32: the product over chunks of (e^gl I - (k e^(gl - gc))^T w), later
    chunks on the left (the state pass with u = 0 from S_in = I); H [N, HV, K, V] float32:
    the state pass from S_in = 0."""
    K = k.shape[3]
    HV, V = u.shape[2], u.shape[3]
    N, dev = layout.num_seqs, k.device
    m_out = torch.empty(N, HV, K, K, dtype=torch.float32, device=dev)
    h_out = torch.empty(N, HV, K, V, dtype=torch.float32, device=dev)
    eye = torch.eye(K, dtype=torch.float32, device=dev).expand(N, HV, K, K).contiguous()
    _launch_state(k, w, None, gc, layout, eye, k_rstd, None, None, m_out, K, False)
    _launch_state(k, w, u, gc, layout, None, k_rstd, None, None, h_out, V, False)
    return m_out, h_out


# ---------------------------------------------------------------------------------------------
# 3. the output, parallel over chunks
# ---------------------------------------------------------------------------------------------

# BV 64 won at every shape S1-S5 on H200 (BV 128 / 8 warps was the other); offline (sm_90a,
# bf16) it takes 202 registers at K = V = 128 (two 4-warp programs per SM) and 168 with no
# spills when capped (three per SM; 32 B of spills at K 256 / V 512): the second candidate,
# not yet timed on a GPU
@autotune_or_fixed(
    configs=[triton.Config({"BV": 64}, num_warps=4, num_stages=2),
             triton.Config({"BV": 64}, num_warps=4, num_stages=2, maxnreg=168)],
    # 16 columns: the tests cross V blocks
    interpret_config=triton.Config({"BV": 16}, num_warps=4, num_stages=1),
    key=["H", "HV", "K", "V", "L2", "IS_VARLEN"],
)
@triton.jit
def _output_kernel(
    q, k, v_new, h, gc, k_rstd, q_rstd, o, scale,
    cu_seqlens, chunk_indices, T, NT_SEQ,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, L2: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # program id 0 runs over (chunk, V block), the V blocks of a chunk adjacent (they share its
    # q and k tiles); the chunks are not a grid axis of their own, whose limit of 65535 would
    # cap a call at 4M tokens
    NV: tl.constexpr = (V + BV - 1) // BV
    i_cv, i_hv = tl.program_id(0), tl.program_id(1)
    i_c, i_v = i_cv // NV, i_cv % NV
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
        return (triton.cdiv(V, meta["BV"]) * layout.num_chunks, HV)

    kernel, extra = _output_kernel, {}
    if config is not None:
        kernel = _output_kernel.fn
        extra = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        if config.maxnreg:
            extra["maxnreg"] = config.maxnreg
    kernel[grid if config is None else grid(extra)](
        q, k, v_new, h, gc, k_rstd, q_rstd, o, scale,
        cu, ci, T_arg, nts,
        H=H, HV=HV, K=K, V=V, BK=_pow2_block(K, 256), L2=use_qk_l2norm, IS_VARLEN=varlen,
        **extra,
    )
    return o, q_rstd
