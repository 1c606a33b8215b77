"""Small Triton helpers shared by the chunked kernels (forward and backward).

Token layout: [B, T, ...] tensors are addressed as one flat token axis of B * T rows. A
"global chunk" index i_c runs over the chunks of all sequences: without cu_seqlens chunk c of
batch row b is b * NT_SEQ + c (NT_SEQ = ceil(T / 64)); with cu_seqlens (B == 1) the chunk
table `chunk_indices` [NT, 2] int32 holds (sequence, chunk within the sequence).
"""
import triton
import triton.language as tl


@triton.jit
def chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT_SEQ, BT: tl.constexpr,
                 IS_VARLEN: tl.constexpr):
    """Global chunk i_c -> (sequence i_n, its first token bos, its end eos, chunk start t0)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2)
        i_t = tl.load(chunk_indices + i_c * 2 + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_n = i_c // NT_SEQ
        i_t = i_c % NT_SEQ
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return i_n, bos, eos, bos + i_t * BT


@triton.jit
def sequence_bounds(i_n, cu_seqlens, chunk_offsets, T, NT_SEQ, BT: tl.constexpr,
                    IS_VARLEN: tl.constexpr):
    """Sequence i_n -> (bos, eos, number of chunks, its first global chunk)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        nt = tl.cdiv(eos - bos, BT).to(tl.int32)
        c_off = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        nt = NT_SEQ
        c_off = i_n.to(tl.int64) * NT_SEQ
    return bos, eos, nt, c_off


@triton.jit
def softplus(x):
    # log1p(exp(x)), linear above 20 where exp would lose nothing but could overflow.
    # log1p(e) as log(u) e / (u - 1), u = fl(1 + e): the rounding of 1 + e cancels in the
    # ratio (plain log(1 + e) is off by up to eps / (2 e) relative, 1e-5 at x = -5)
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x > 20.0, x, lp)
