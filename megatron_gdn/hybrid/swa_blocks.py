"""Sliding-window causal attention from two dense causal attentions per window-sized block.

With the sequence cut into blocks of w tokens (w = the window), query t of block b sees keys
t - w + 1 .. t: all of block b up to itself (a causal block) and, of block b - 1, the keys
after its own position inside the block (local key index > local query index, strictly above
the diagonal). Reversing the order of the rows and of the keys inside a block turns "strictly
above" into "strictly below", which is a causal block once the one query that sees nothing
there (the block's last) and the one key nobody sees (the previous block's first) are dropped:
a square causal attention of w - 1 rows. So every block costs two causal attentions of size
w, about T w multiply-adds in all against T^2 / 2 for full causal attention (4x fewer at
T = 16K, w = 2048), and both run in flash kernels instead of a masked one.

The two partial results are merged with their log-sum-exps (o = sum_i e^(lse_i - lse) o_i,
lse = log sum_i e^lse_i). The backward of each part takes the merged output and
log-sum-exp: then its probabilities exp(s - lse) are the merged ones and its row term
rowsum(do * o) is the merged row's, so the parts' gradients add up to the exact gradient
(the ring-attention identity).

`swa_attention(q, k, v, window, scale, kernel)`: q, k, v [N, H, T, D] (same heads); kernel
"flash" (CUDA, bf16 / fp16: torch's flash-attention ops) or "math" (any device and dtype, the
same forward / backward written in torch; the CPU tests run it). T need not be a multiple of
the window: the tail is zero-padded at the end, where no real query can see it.
"""
from __future__ import annotations

import math

import torch

__all__ = ["swa_attention", "flash_swa_supported"]


# ------------------------------------------------------------------- causal block attention
# A kernel: fwd(q, k, v, scale) -> (o, lse float32, aux) over square causal blocks
# [N, H, L, D]; bwd(do, q, k, v, o, lse, aux, scale) -> (dq, dk, dv) with o, lse the merged
# ones; aux: what the backward needs of its forward call.
def _acc(x):
    """The math kernel's accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _causal_scores(q, k, scale):
    s = torch.matmul(q.to(_acc(q)), k.to(_acc(q)).transpose(-1, -2)) * scale
    L = q.shape[-2]
    return s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1),
                         float("-inf"))


def _math_fwd(q, k, v, scale):
    s = _causal_scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse[..., None]), v.to(s.dtype))
    return o.to(q.dtype), lse, None


def _math_bwd(do, q, k, v, o, lse, aux, scale):
    p = torch.exp(_causal_scores(q, k, scale) - lse[..., None])
    acc = p.dtype
    dof = do.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, v.to(acc).transpose(-1, -2))
    ds = p * (dp - (dof * o.to(acc)).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _flash_fwd(q, k, v, scale):
    # (out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, mask)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                              scale=scale)
    return out[0], out[1][..., :q.shape[-2]].float(), tuple(out[2:8])


def _flash_bwd(do, q, k, v, o, lse, aux, scale):
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do.contiguous(), q, k, v, o.contiguous(), lse.contiguous(), cum_q, cum_k, max_q, max_k,
        0.0, True, seed, offset, scale=scale)


_KERNELS = {"math": (_math_fwd, _math_bwd), "flash": (_flash_fwd, _flash_bwd)}


def flash_swa_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the flash kernel takes these inputs: CUDA, bf16 / fp16, same heads, D <= 256."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype
            and q.shape[1] == k.shape[1] and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


# ------------------------------------------------------------------------------ the layout
def _blocks(x, w):
    """[N, H, T, D] (T a multiple of w) -> [N * nb, H, w, D]."""
    N, H, T, D = x.shape
    return x.reshape(N, H, T // w, w, D).transpose(1, 2).reshape(N * (T // w), H, w, D)


def _unblocks(x, N, nb):
    """[N * nb, H, w, D] -> [N, H, nb * w, D]."""
    _, H, w, D = x.shape
    return x.reshape(N, nb, H, w, D).transpose(1, 2).reshape(N, H, nb * w, D)


def _query_rows(x, N, nb):
    """Rows 0..w-2 of blocks 1..nb-1, reversed inside the block: [N * (nb - 1), H, w - 1, D]
    (the queries of the strictly-upper parts, and whatever is per query: do, o, lse)."""
    x = x.reshape((N, nb) + x.shape[1:])[:, 1:, :, :x.shape[2] - 1].flip(3)
    return x.reshape((N * (nb - 1),) + x.shape[2:]).contiguous()


def _key_rows(x, N, nb):
    """Rows 1..w-1 of blocks 0..nb-2, reversed inside the block (their keys / values)."""
    x = x.reshape((N, nb) + x.shape[1:])[:, :-1, :, 1:].flip(3)
    return x.reshape((N * (nb - 1),) + x.shape[2:]).contiguous()


class _SWABlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, kernel):
        fwd, _ = _KERNELS[kernel]
        N, H, T, D = q.shape
        w = window
        nb = math.ceil(T / w)
        pad = nb * w - T
        if pad:
            q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        qb, kb, vb = (_blocks(x.contiguous(), w) for x in (q, k, v))
        o, lse, aux1 = fwd(qb, kb, vb, scale)
        aux2 = None
        if nb > 1 and w > 1:
            o2, l2, aux2 = fwd(_query_rows(qb, N, nb), _key_rows(kb, N, nb),
                               _key_rows(vb, N, nb), scale)
            # back into the rows they belong to: blocks 1..nb-1, rows w-2..0 (reversed)
            o2 = o2.reshape(N, nb - 1, H, w - 1, D).flip(3)
            l2 = l2.reshape(N, nb - 1, H, w - 1).flip(3)
            o = o.to(_acc(q)).reshape(N, nb, H, w, D).clone()
            lse = lse.reshape(N, nb, H, w).clone()
            l1 = lse[:, 1:, :, :w - 1]
            lm = torch.logaddexp(l1, l2)
            o[:, 1:, :, :w - 1] = (torch.exp(l1 - lm)[..., None] * o[:, 1:, :, :w - 1]
                                   + torch.exp(l2 - lm)[..., None] * o2.to(o.dtype))
            lse[:, 1:, :, :w - 1] = lm
            o = o.reshape(N * nb, H, w, D)
            lse = lse.reshape(N * nb, H, w)
        o = o.to(q.dtype)
        ctx.save_for_backward(qb, kb, vb, o, lse)
        ctx.meta = (N, H, T, D, w, nb, scale, kernel, aux1, aux2)
        return _unblocks(o, N, nb)[:, :, :T]

    @staticmethod
    def backward(ctx, do):
        qb, kb, vb, o, lse = ctx.saved_tensors
        N, H, T, D, w, nb, scale, kernel, aux1, aux2 = ctx.meta
        _, bwd = _KERNELS[kernel]
        pad = nb * w - T
        if pad:
            do = torch.nn.functional.pad(do, (0, 0, 0, pad))
        dob = _blocks(do.contiguous(), w)
        dq, dk, dv = bwd(dob, qb, kb, vb, o, lse, aux1, scale)
        if nb > 1 and w > 1:
            # the strictly-upper parts with the merged rows' output and lse
            dq2, dk2, dv2 = bwd(_query_rows(dob, N, nb), _query_rows(qb, N, nb),
                                _key_rows(kb, N, nb), _key_rows(vb, N, nb),
                                _query_rows(o, N, nb), _query_rows(lse[..., None], N, nb)[..., 0],
                                aux2, scale)
            acc = _acc(qb)
            dq, dk, dv = (x.to(acc).reshape(N, nb, H, w, D) for x in (dq, dk, dv))
            dq[:, 1:, :, :w - 1] += dq2.to(acc).reshape(N, nb - 1, H, w - 1, D).flip(3)
            dk[:, :-1, :, 1:] += dk2.to(acc).reshape(N, nb - 1, H, w - 1, D).flip(3)
            dv[:, :-1, :, 1:] += dv2.to(acc).reshape(N, nb - 1, H, w - 1, D).flip(3)
            dq, dk, dv = (x.reshape(N * nb, H, w, D) for x in (dq, dk, dv))
        grads = tuple(_unblocks(x.to(qb.dtype), N, nb)[:, :, :T] for x in (dq, dk, dv))
        return grads + (None, None, None)


def swa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                  kernel: str = "flash") -> torch.Tensor:
    """Sliding-window causal attention, query t over keys t - window + 1 .. t; [N, H, T, D]."""
    if kernel not in _KERNELS:
        raise ValueError(f"kernel={kernel!r}: expected one of {sorted(_KERNELS)}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape [N, H, T, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    return _SWABlocks.apply(q, k, v, min(window, q.shape[2]), scale, kernel)
