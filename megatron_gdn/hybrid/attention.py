"""Softmax attention cores for hybrid stacks, without Transformer Engine.

`SDPACoreAttention` fills the `core_attention` slot of Megatron's SelfAttention (same
constructor keywords and forward signature as megatron.core's DotProductAttention in 0.19.2):
causal full attention, or sliding-window attention (SWA) with `window=w` (query t sees keys
t-w+1 .. t of its own sequence). Grouped-query attention, packed THD sequences (no attention
across documents) and context parallelism in Megatron's zigzag layout are supported. RoPE and
the optional sigmoid output gate stay in Megatron's SelfAttention (it applies both around the
core, per CP rank).

Every case reduces to one masked attention over a query set and a key set, each token tagged
with (position in its sequence, document id):

    allowed(q, k) = doc_q == doc_k  and  pos_k <= pos_q  and  pos_q - pos_k < window

- no CP: queries = keys = the local tokens.
- CP, full attention: keys = K/V of all ranks (one all-gather; its backward reduce-scatters
  dK/dV), tagged with their global positions; the mask gives each of the two local zigzag
  pieces its own causal boundary.
- CP, SWA: keys = for each local piece, the w-1 tokens preceding it in its sequence (the
  "halo": from the tails of the preceding pieces, one all-gather of per-piece tails of w-1
  tokens, independent of the sequence length) followed by the piece itself.

Kernels: on the GPU plain causal attention is SDPA with is_causal (cuDNN or flash); without CP, SWA
and packed THD documents (causal or SWA) run FlashAttention-2's varlen kernels with their
window (swa_varlen.py: one call, ~ T * w work; bf16 / fp16), where the torch build has them;
else plain SWA is two flash causal attentions per window-sized block merged by their
log-sum-exps (swa_blocks.py); everything else (CP) is flex attention with a block mask built
from the rule above (masked-out 128 x 128 blocks are skipped). On the CPU, SDPA with the dense
boolean mask. Plain rows with a window go first to cuDNN's band kernels where the optional
nvidia-cudnn-frontend package is installed and its check passes (swa_cudnn.py; the fastest of
the four on an H100), then to the varlen kernels. Where a FlashAttention-3 build is found and
its check passes (swa_fa3.py; Hopper only), all of these go to its kernels instead (full
causal attention too: 6.39 ms against SDPA's 6.97 at 16K tokens on an H100), and under CP each
local piece is one FA3 call instead of flex:
its queries against its keys (full attention: its sequence's gathered tokens up to it,
reordered by position; SWA: the valid part of its halo, then itself), FA3 aligning the causal
mask to the last key (MaskSpec.segments, _segment_plan).

Legend: T tokens (local), Tk keys, B batch rows, H query heads, G key/value heads, D head dim,
W context-parallel size, N sequences, P piece length, w window.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_gdn.hybrid.swa_blocks import flash_swa_supported, swa_attention
from megatron_gdn.hybrid.swa_cudnn import cudnn_causal_attention, cudnn_swa_supported
from megatron_gdn.hybrid.swa_fa3 import fa3_attention, fa3_supported, fa3_varlen_attention
from megatron_gdn.hybrid.swa_varlen import varlen_causal_attention, varlen_flash_supported
from megatron_gdn.parallel.collectives import all_gather_start, reduce_scatter

__all__ = ["MaskSpec", "masked_attention", "SDPACoreAttention", "reference_attention"]

# document id of halo slots that lie before their sequence's start (never matches a query)
_NO_DOC = -1


@dataclass
class MaskSpec:
    """Positions and document ids of queries [T] and keys [Tk] (int64, on the device), the
    window (None: full causal) and `plain`: True when queries = keys = positions 0..T-1 of one
    document (the caller knows; it selects SDPA's is_causal fast path). `cache_key`: hashable
    description of the mask for the flex block-mask cache (None: do not cache). `cu_seqlens`:
    for packed documents without CP (queries = keys = the documents back to back, B = 1), their
    boundaries as a tuple of ints; the varlen kernels need them. `segments`: under CP, where
    FA3 may run them (see _segment_plan), the queries cut into runs of consecutive positions,
    each with the keys it reads: ((q0, q1, keys), ...), keys a (k0, k1) slice of the key axis or
    a LongTensor of key rows in position order."""

    q_pos: torch.Tensor
    q_doc: torch.Tensor
    k_pos: torch.Tensor
    k_doc: torch.Tensor
    window: Optional[int]
    plain: bool = False
    cache_key: Optional[tuple] = None
    cu_seqlens: Optional[tuple] = None
    segments: Optional[tuple] = None

    def dense(self) -> torch.Tensor:
        """[T, Tk] boolean mask, True where attention is allowed."""
        qp, kp = self.q_pos[:, None], self.k_pos[None, :]
        allowed = (self.q_doc[:, None] == self.k_doc[None, :]) & (kp <= qp)
        if self.window is not None:
            allowed &= (qp - kp) < self.window
        return allowed


# ------------------------------------------------------------------------------------ kernels
@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # flex attention is only fast compiled; shapes are static within a run
    return torch.compile(flex_attention, dynamic=False)


_BLOCK_MASKS: dict = {}
_MAX_CACHED_MASKS = 64


def _block_mask(mask: MaskSpec, tq: int, tk: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = None if mask.cache_key is None else (mask.cache_key, tq, tk, str(device))
    if key is not None and key in _BLOCK_MASKS:
        return _BLOCK_MASKS[key]
    window = mask.window
    if mask.plain:
        def mask_mod(b, h, q_idx, kv_idx):
            ok = kv_idx <= q_idx
            if window is not None:
                ok = ok & (q_idx - kv_idx < window)
            return ok
    else:
        q_pos, q_doc, k_pos, k_doc = mask.q_pos, mask.q_doc, mask.k_pos, mask.k_doc

        def mask_mod(b, h, q_idx, kv_idx):
            qp, kp = q_pos[q_idx], k_pos[kv_idx]
            ok = (q_doc[q_idx] == k_doc[kv_idx]) & (kp <= qp)
            if window is not None:
                ok = ok & (qp - kp < window)
            return ok
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=tq, KV_LEN=tk, device=device)
    if key is not None:
        if len(_BLOCK_MASKS) >= _MAX_CACHED_MASKS:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = block_mask
    return block_mask


def masked_attention(q_tbhd: torch.Tensor, k_tbgd: torch.Tensor, v_tbgd: torch.Tensor,
                     mask: MaskSpec, scale: float, dropout_p: float = 0.0,
                     backend: str = "auto") -> torch.Tensor:
    """softmax(scale q k^T + mask) v per batch row and head; returns o [T, B, H, D].

    q [T, B, H, D]; k, v [Tk, B, G, D] with H a multiple of G (query head i reads kv head
    i // (H // G)). backend: "auto" (GPU: FA3 where swa_fa3.py finds a build that passes its
    check, for every mask it takes; else SDPA is_causal for plain causal masks; cuDNN's band
    kernels for plain windows where swa_cudnn.py runs; the varlen
    flash kernels for windows and packed documents where they take the inputs, else the block
    decomposition of swa_blocks.py for plain windows, else flex; CPU: dense mask), "dense"
    (SDPA with the dense boolean mask), "flex", "blocks" (plain windows only), "varlen" (plain
    rows or packed documents, no CP); the last two run flash kernels where they take the
    inputs, else the same attention in torch. "cudnn": plain rows, causal or windowed, on
    cuDNN's band kernels (swa_cudnn.py; needs the optional nvidia-cudnn-frontend package and a
    GPU, else a ValueError). "fa3": plain rows or packed documents, causal or windowed, on
    FlashAttention-3's Hopper kernels (swa_fa3.py; needs an FA3 install or build and an H100 /
    H200, else a ValueError).
    """
    if backend not in ("auto", "dense", "flex", "blocks", "varlen", "cudnn", "fa3"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'dense', 'flex', 'blocks', "
                         "'varlen', 'cudnn' or 'fa3'")
    T, B, H, D = q_tbhd.shape
    Tk, G = k_tbgd.shape[0], k_tbgd.shape[2]
    if H % G != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    q = q_tbhd.permute(1, 2, 0, 3)
    k = k_tbgd.permute(1, 2, 0, 3)
    v = v_tbgd.permute(1, 2, 0, 3)
    # the varlen kernels take plain rows or packed documents with their boundaries, no CP
    varlen_layout = T == Tk and (mask.plain or (mask.cu_seqlens is not None and B == 1))
    if backend == "auto":
        backend = "dense" if q.device.type != "cuda" else "flex"
        fa3_ok = backend == "flex" and dropout_p == 0.0 and fa3_supported(q)
        if backend == "flex" and mask.plain and mask.window is None and not fa3_ok:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                               dropout_p=dropout_p, enable_gqa=G != H)
            return o.permute(2, 0, 1, 3)
        if fa3_ok and (varlen_layout or mask.segments is not None):
            # FlashAttention-3's Hopper kernels, where a build of it is installed and passes its
            # check: window 2048 / 16K 2.09 ms against cuDNN's band 2.83, causal 6.39 against
            # SDPA's 6.97 on an H100 (benchmarks/RESULTS.md)
            backend = "fa3"
        elif (backend == "flex" and mask.plain and mask.window is not None and dropout_p == 0.0
                and T == Tk and cudnn_swa_supported(q)):
            # cuDNN's band kernel: 2.80 ms against varlen's 3.69 and flex's 3.57 at w = 2048,
            # 16K tokens, 16 x 128 on an H100 (benchmarks/RESULTS.md)
            backend = "cudnn"
        elif (backend == "flex" and varlen_layout and dropout_p == 0.0
                and varlen_flash_supported(q)):
            backend = "varlen"
        elif (backend == "flex" and mask.plain and mask.window is not None and dropout_p == 0.0
                and G == H and T == Tk and flash_swa_supported(q, k)):
            backend = "blocks"
    if backend == "cudnn":
        if not mask.plain or T != Tk:
            raise ValueError("backend='cudnn' is for plain sequences (no packing, no context "
                             "parallelism)")
        if dropout_p > 0.0:
            raise ValueError(f"attention_dropout={dropout_p}: backend='cudnn' has no dropout")
        if not cudnn_swa_supported(q):
            raise ValueError("backend='cudnn' needs a CUDA device, bf16 / fp16, a head dim that "
                             "is a multiple of 8 up to 256 and the nvidia-cudnn-frontend package "
                             "(>= 1.32) whose band attention passed its check on this machine")
        if G != H:
            k, v = (x.repeat_interleave(H // G, dim=1) for x in (k, v))
        o = cudnn_causal_attention(q, k, v, mask.window, scale)
        return o.permute(2, 0, 1, 3)
    if backend == "fa3":
        if not varlen_layout and mask.segments is None:
            raise ValueError("backend='fa3' is for plain sequences, packed documents given by "
                             "MaskSpec.cu_seqlens (B = 1), or query runs given by "
                             "MaskSpec.segments (context parallelism)")
        if dropout_p > 0.0:
            raise ValueError(f"attention_dropout={dropout_p}: backend='fa3' has no dropout")
        if not fa3_supported(q):
            raise ValueError("backend='fa3' needs an H100 / H200, bf16 / fp16, a head dim the "
                             "FlashAttention-3 build has, and that build (swa_fa3.py says where "
                             "it is looked for) passing its check on this machine")
        # [B, H, T, D] views of [T, B, H, D] -> FA3's [B, T, H, D]: strides only, no copy
        q3, k3, v3 = (x.transpose(1, 2) for x in (q, k, v))
        if not varlen_layout:
            # one call per run of queries, its keys ending at its last query (FA3 aligns the
            # causal mask to the bottom right when there are more keys than queries)
            outs = []
            for q0, q1, keys in mask.segments:
                if isinstance(keys, tuple):
                    kk, vv = k3[:, keys[0]:keys[1]], v3[:, keys[0]:keys[1]]
                else:
                    kk, vv = k3.index_select(1, keys), v3.index_select(1, keys)
                outs.append(fa3_attention(q3[:, q0:q1], kk, vv, mask.window, scale))
            return torch.cat(outs, dim=1).permute(1, 0, 2, 3)
        if mask.plain:
            o = fa3_attention(q3, k3, v3, mask.window, scale)
            return o.permute(1, 0, 2, 3)
        o = fa3_varlen_attention(q3[0], k3[0], v3[0], mask.cu_seqlens, mask.window, scale)
        return o.unsqueeze(1)
    if backend == "varlen":
        if not varlen_layout:
            raise ValueError("backend='varlen' is for plain sequences or packed documents given "
                             "by MaskSpec.cu_seqlens (B = 1), without context parallelism")
        if dropout_p > 0.0:
            raise ValueError(f"attention_dropout={dropout_p}: backend='varlen' has no dropout")
        cu = list(mask.cu_seqlens) if not mask.plain else list(range(0, B * T + 1, T))
        # [B, H, T, D] -> [B T, H, D]: rows back to back (a copy only for B > 1)
        q2, k2, v2 = (x.transpose(1, 2).reshape(B * x.shape[2], x.shape[1], D) for x in (q, k, v))
        o = varlen_causal_attention(q2, k2, v2, cu, mask.window, scale,
                                    kernel="flash" if varlen_flash_supported(q2) else "math")
        return o.view(B, T, H, D).transpose(0, 1)
    if backend == "blocks":
        if not mask.plain or mask.window is None or T != Tk:
            raise ValueError("backend='blocks' is for sliding windows over one plain sequence "
                             "(no packing, no context parallelism)")
        if dropout_p > 0.0:
            raise ValueError(f"attention_dropout={dropout_p}: backend='blocks' has no dropout")
        if G != H:
            k, v = (x.repeat_interleave(H // G, dim=1) for x in (k, v))
        q, k, v = (x.contiguous() for x in (q, k, v))
        o = swa_attention(q, k, v, mask.window, scale,
                          kernel="flash" if flash_swa_supported(q, k) else "math")
        return o.permute(2, 0, 1, 3)
    if backend == "flex":
        if dropout_p > 0.0:
            raise ValueError(f"attention_dropout={dropout_p}: flex attention has no dropout; set "
                             "attention_dropout to 0 for windowed, packed or context-parallel "
                             "attention on the GPU")
        block_mask = _block_mask(mask, T, Tk, q.device)
        o = _compiled_flex()(q.contiguous(), k.contiguous(), v.contiguous(),
                             block_mask=block_mask, scale=scale, enable_gqa=G != H)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), scale=scale,
                                           dropout_p=dropout_p, enable_gqa=G != H)
    return o.permute(2, 0, 1, 3)


def reference_attention(q_tbhd, k_tbgd, v_tbgd, mask: MaskSpec, scale: float) -> torch.Tensor:
    """Explicit softmax over the dense mask (float64 oracle for tests; same signature)."""
    H, G = q_tbhd.shape[2], k_tbgd.shape[2]
    k = k_tbgd.repeat_interleave(H // G, dim=2)
    v = v_tbgd.repeat_interleave(H // G, dim=2)
    scores = torch.einsum("tbhd,sbhd->bhts", q_tbhd, k) * scale
    scores = scores.masked_fill(~mask.dense(), float("-inf"))
    return torch.einsum("bhts,sbhd->tbhd", scores.softmax(-1), v)


# ----------------------------------------------------------------- context-parallel plumbing
class _GatherRows(torch.autograd.Function):
    """x [n, ...] on each rank of `group` -> out [m, ...] = cat_r(x_r)[index] (index None: all
    W * n rows; an index equal to W * n selects a zero row). Backward: the adjoint, scatter-add
    into [W * n, ...] and reduce-scatter, so each rank gets the gradient of its own rows."""

    @staticmethod
    def forward(ctx, x, index, group):
        _, wait = all_gather_start(x, group)
        gathered = wait()
        rows = gathered.shape[0]
        if index is None:
            out = gathered
        else:
            padded = torch.cat([gathered, gathered.new_zeros((1,) + tuple(gathered.shape[1:]))])
            out = padded.index_select(0, index)
        ctx.save_for_backward(index)
        ctx.group, ctx.rows, ctx.has_index = group, rows, index is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        (index,) = ctx.saved_tensors
        if ctx.has_index:
            full = dout.new_zeros((ctx.rows + 1,) + tuple(dout.shape[1:]))
            full.index_add_(0, index, dout)
            full = full[:ctx.rows]
        else:
            full = dout
        # index, group: not differentiable
        return reduce_scatter(full, ctx.group), None, None


@dataclass(frozen=True)
class AttentionCPLayout:
    """Megatron's zigzag CP layout of one row of the tokens axis: every sequence n (dense: the
    row; packed THD: each document, padded length L_n a multiple of 2W) is cut into 2W pieces of
    P_n = L_n / 2W tokens and rank r holds pieces r and 2W-1-r of each, in sequence order. The
    local stream is 2N "segments" [seq0 piece r | seq0 piece 2W-1-r | seq1 piece r | ...]."""

    cp_size: int
    cp_rank: int
    seq_lens: tuple

    @classmethod
    def from_input(cls, cu_global, local_len: int, cp_size: int, cp_rank: int) -> "AttentionCPLayout":
        """cu_global: the GLOBAL (padded) cu_seqlens of packed input (Megatron leaves them
        unsharded), or None for dense rows of W * local_len tokens."""
        if cu_global is None:
            if local_len % 2:
                raise ValueError(f"the local sequence length {local_len} must be even under context "
                                 f"parallelism (two zigzag pieces of the global length {local_len * cp_size})")
            return cls(cp_size, cp_rank, (local_len * cp_size,))
        cu = [int(c) for c in (cu_global.tolist() if isinstance(cu_global, torch.Tensor) else cu_global)]
        if cu[-1] != local_len * cp_size:
            raise ValueError(f"cu_seqlens[-1]={cu[-1]} must equal context_parallel_size * local tokens "
                             f"= {cp_size} * {local_len} (the global padded cu_seqlens of the pack)")
        lens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
        for n, length in enumerate(lens):
            if length % (2 * cp_size):
                raise ValueError(f"packed sequence {n} has (padded) length {length}, not divisible by "
                                 f"2 * context_parallel_size = {2 * cp_size} (use cu_seqlens_q_padded)")
        return cls(cp_size, cp_rank, lens)

    @property
    def num_segments(self) -> int:
        return 2 * len(self.seq_lens)

    @property
    def piece_lens(self) -> tuple:
        return tuple(length // (2 * self.cp_size) for length in self.seq_lens)

    def local_pieces(self, rank: Optional[int] = None) -> tuple:
        r = self.cp_rank if rank is None else rank
        return r, 2 * self.cp_size - 1 - r

    @property
    def local_cu(self) -> list:
        cu = [0]
        for p in self.piece_lens:
            cu += [cu[-1] + p, cu[-1] + 2 * p]
        return cu

    def segment_row(self, rank: int, seq: int, slot: int) -> int:
        """Index of (rank, sequence, slot) among the W * 2N segments of an all-gather."""
        return (rank * len(self.seq_lens) + seq) * 2 + slot


@functools.lru_cache(maxsize=256)
def _token_tags(layout: AttentionCPLayout, rank: int):
    """(position in sequence, document id) of rank `rank`'s local tokens, in local order."""
    pos, doc = [], []
    for n, plen in enumerate(layout.piece_lens):
        for piece in layout.local_pieces(rank):
            pos += range(piece * plen, (piece + 1) * plen)
            doc += [n] * plen
    return torch.tensor(pos, dtype=torch.long), torch.tensor(doc, dtype=torch.long)


@functools.lru_cache(maxsize=256)
def _halo_index(layout: AttentionCPLayout, h: int) -> torch.Tensor:
    """[2N * h] rows of the gathered tails [W * 2N * h (+ a zero row)] forming the h tokens that
    precede each local segment in its sequence (oldest first); the zero row before the start.
    Segment tails hold the last min(P, h) tokens of the segment, right aligned in h slots."""
    zero_row = layout.cp_size * layout.num_segments * h
    rows = []
    for n, plen in enumerate(layout.piece_lens):
        for piece in layout.local_pieces():
            for i in range(h):
                pos = piece * plen - h + i
                if plen == 0 or pos < 0:
                    rows.append(zero_row)
                    continue
                j, o = divmod(pos, plen)
                owner, slot = (j, 0) if j < layout.cp_size else (2 * layout.cp_size - 1 - j, 1)
                rows.append(layout.segment_row(owner, n, slot) * h + h - (plen - o))
    return torch.tensor(rows, dtype=torch.long)


def _halo_positions(layout: AttentionCPLayout, window: int):
    """Positions of the w-1 halo slots before each of the 2N local segments [2N * (w-1)], and
    whether each slot holds a token (False before its sequence's start)."""
    h = window - 1
    pos, valid = [], []
    for length in layout.seq_lens:
        plen = length // (2 * layout.cp_size)
        for piece in layout.local_pieces():
            for i in range(h):
                p = piece * plen - h + i
                pos.append(max(p, 0))
                valid.append(plen > 0 and p >= 0)
    return torch.tensor(pos, dtype=torch.long), torch.tensor(valid, dtype=torch.bool)


def _tail_index(layout: AttentionCPLayout, window: int, tokens: int) -> torch.Tensor:
    """[2N * (w-1)] local rows forming each segment's tail (the last min(P, w-1) tokens, right
    aligned in a slot of w-1); `tokens` (the zero row) for empty slots."""
    h = window - 1
    cu = layout.local_cu
    index = []
    for i in range(layout.num_segments):
        m = min(cu[i + 1] - cu[i], h)
        index += [tokens] * (h - m) + list(range(cu[i + 1] - m, cu[i + 1]))
    return torch.tensor(index, dtype=torch.long)


def _cp_keys(k_tbgd, v_tbgd, layout: AttentionCPLayout, window: Optional[int], group):
    """Keys/values this rank's queries need under CP, with their tags. `layout` describes one
    row of the tokens axis (dim 0); the batch rows of dense input share it.

    Returns k, v [Tk, B, G, D], k_pos, k_doc [Tk] and q_doc [T] (CPU). With a window, a token
    can be both a local key and in the halo of the other local piece; each key copy then
    serves one local segment only: the "document" of queries and keys is the local segment.
    """
    G = k_tbgd.shape[2]
    kv = torch.cat([k_tbgd, v_tbgd], dim=2)
    loc_pos, loc_doc = _token_tags(layout, layout.cp_rank)
    if window is None:
        kv_all = _GatherRows.apply(kv, None, group)
        tags = [_token_tags(layout, r) for r in range(layout.cp_size)]
        k_pos = torch.cat([t[0] for t in tags])
        k_doc = torch.cat([t[1] for t in tags])
        return kv_all[:, :, :G], kv_all[:, :, G:], k_pos, k_doc, loc_doc
    h = window - 1
    T = kv.shape[0]
    padded = torch.cat([kv, kv.new_zeros((1,) + tuple(kv.shape[1:]))])
    tails = padded.index_select(0, _tail_index(layout, window, T).to(kv.device))
    index = _halo_index(layout, h).to(kv.device)
    halo = _GatherRows.apply(tails, index, group)
    halo_pos, halo_valid = _halo_positions(layout, window)
    # keys ordered [halo_0 | segment_0 | halo_1 | segment_1 | ...] (a band for the block mask)
    cu = layout.local_cu
    parts, pos, doc, q_doc = [], [], [], []
    for i in range(layout.num_segments):
        n = cu[i + 1] - cu[i]
        parts += [halo[i * h:(i + 1) * h], kv[cu[i]:cu[i + 1]]]
        pos += [halo_pos[i * h:(i + 1) * h], loc_pos[cu[i]:cu[i + 1]]]
        seg_halo = torch.full((h,), i, dtype=torch.long)
        seg_halo[~halo_valid[i * h:(i + 1) * h]] = _NO_DOC
        doc += [seg_halo, torch.full((n,), i, dtype=torch.long)]
        q_doc.append(torch.full((n,), i, dtype=torch.long))
    keys = torch.cat(parts)
    return keys[:, :, :G], keys[:, :, G:], torch.cat(pos), torch.cat(doc), torch.cat(q_doc)


def _segment_plan(q_pos, q_doc, k_pos, k_doc, window: Optional[int]):
    """MaskSpec.segments from the (CPU) tags, or None where FA3's calls cannot express the mask.

    The queries are cut into runs (same document, consecutive positions p0..p1). A run's keys
    are those of its document at positions up to p1 (and, with a window, from p0 - window + 1):
    they must be one run of consecutive positions ending at p1 and starting at or before p0
    (each position once). Then FA3's causal mask with the keys aligned to the bottom right
    (query p0 + i sees key index i + p0 - first key position, and back by the window) is this
    module's rule. Under CP, full attention: a piece's keys are its sequence's first p1 + 1
    tokens (gathered, reordered by position); SWA: the valid part of its halo, then itself.
    """
    T = q_pos.numel()
    if T == 0:
        return None
    cut = ((q_doc[1:] != q_doc[:-1]) | (q_pos[1:] != q_pos[:-1] + 1)).nonzero().flatten() + 1
    bounds = [0] + cut.tolist() + [T]
    plan = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        doc, p0, p1 = int(q_doc[a]), int(q_pos[a]), int(q_pos[b - 1])
        sel = (k_doc == doc) & (k_pos <= p1)
        if window is not None:
            sel &= k_pos > p0 - window
        rows = sel.nonzero().flatten()
        if rows.numel() == 0:
            return None
        rows = rows[k_pos[rows].argsort(stable=True)]
        kp = k_pos[rows]
        if int(kp[-1]) != p1 or int(kp[0]) > p0 or not bool((kp[1:] == kp[:-1] + 1).all()):
            return None
        if bool((rows[1:] == rows[:-1] + 1).all()):
            plan.append((a, b, (int(rows[0]), int(rows[-1]) + 1)))
        else:
            plan.append((a, b, rows))
    return tuple(plan)


_SEGMENT_PLANS: dict = {}


def _cached_segment_plan(cache_key, device, q_pos, q_doc, k_pos, k_doc, window):
    """_segment_plan per (mask, device), its key rows moved to the device once."""
    key = (cache_key, str(device))
    if key not in _SEGMENT_PLANS:
        plan = _segment_plan(q_pos, q_doc, k_pos, k_doc, window)
        if plan is not None:
            plan = tuple((a, b, keys if isinstance(keys, tuple) else keys.to(device))
                         for a, b, keys in plan)
        if len(_SEGMENT_PLANS) >= _MAX_CACHED_MASKS:
            _SEGMENT_PLANS.clear()
        _SEGMENT_PLANS[key] = plan
    return _SEGMENT_PLANS[key]


# ------------------------------------------------------------------------ the Megatron module
def _doc_tags(cu: list):
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    starts = torch.tensor(cu[:-1], dtype=torch.long)
    return torch.arange(cu[-1]) - starts[doc], doc


class SDPACoreAttention(torch.nn.Module):
    """Megatron core_attention without Transformer Engine: causal or sliding-window attention.

    Constructor keywords as megatron.core's DotProductAttention (what SelfAttention passes),
    plus `window` (tokens each query sees, itself included; None: full causal), which a
    ModuleSpec sets through `params`. Forward: query [sq, b, H, D] and key/value [sq, b, G, D]
    (THD: [t, H, D] / [t, G, D]); returns [sq, b, H * D] ([t, H * D] for THD).

    The attention_mask argument is not read: the mask is causal (plus window and document
    boundaries) by construction, as with Transformer Engine's causal mask type.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 window: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.enums import AttnMaskType

        if attn_mask_type not in (None, AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"attn_mask_type={attn_mask_type}: SDPACoreAttention is causal only")
        if attention_type != "self":
            raise ValueError(f"attention_type={attention_type!r}: only 'self' attention is supported")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise ValueError("apply_query_key_layer_scaling=True is not supported by SDPACoreAttention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r}: SDPACoreAttention supports 'vanilla'")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.config = config
        self.layer_number = layer_number
        self.window = window
        self.backend = backend
        self.cp_group = getattr(pg_collection, "cp", None)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def extra_repr(self) -> str:
        return f"window={self.window}, scale={self.softmax_scale:.4g}"

    def _mask_and_keys(self, key, value, packed_seq_params, is_thd, batch, local_len, device,
                       want_segments=False):
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        cu_seqlens = segments = None
        if cp_size > 1:
            # the batch rows of dense input share one layout (the tokens axis is dim 0 here)
            cu = None
            if is_thd:
                cu = packed_seq_params.cu_seqlens_q_padded
                if cu is None:
                    cu = packed_seq_params.cu_seqlens_q
            layout = AttentionCPLayout.from_input(cu, local_len, cp_size, self.cp_group.rank())
            q_pos, _ = _token_tags(layout, layout.cp_rank)
            key, value, k_pos, k_doc, q_doc = _cp_keys(key, value, layout, self.window,
                                                       self.cp_group)
            cache_key = ("cp", layout.seq_lens, cp_size, layout.cp_rank, self.window)
            plain = False
            if want_segments:
                segments = _cached_segment_plan(cache_key, device, q_pos, q_doc, k_pos, k_doc,
                                                self.window)
        elif is_thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            cu = [int(c) for c in cu.tolist()]
            if cu[-1] != local_len:
                raise ValueError(f"packed_seq_params.cu_seqlens_q[-1]={cu[-1]} does not match "
                                 f"the {local_len} tokens of the input")
            q_pos, q_doc = _doc_tags(cu)
            k_pos, k_doc = q_pos, q_doc
            cache_key = ("thd", tuple(cu), self.window)
            plain = len(cu) == 2
            cu_seqlens = tuple(cu)
        else:
            q_pos = torch.arange(local_len)
            q_doc = torch.zeros(local_len, dtype=torch.long)
            k_pos, k_doc = q_pos, q_doc
            cache_key = ("dense", local_len, self.window)
            plain = True
        mask = MaskSpec(q_pos.to(device), q_doc.to(device), k_pos.to(device), k_doc.to(device),
                        self.window, plain=plain, cache_key=cache_key, cu_seqlens=cu_seqlens,
                        segments=segments)
        return key, value, mask

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPACoreAttention")
        is_thd = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "thd") == "thd"
        if is_thd:
            # [t, H, D] -> [t, 1, H, D]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        T, B, H, D = query.shape
        dropout_p = self.dropout_p if self.training else 0.0
        # under CP, FA3 takes the pieces one call each (a plan per layout, cached), where it runs
        want_segments = (self.cp_group is not None and self.cp_group.size() > 1
                         and self.backend in ("auto", "fa3") and dropout_p == 0.0
                         and fa3_supported(query))
        key, value, mask = self._mask_and_keys(key, value, packed_seq_params, is_thd, B, T,
                                               query.device, want_segments)
        o_tbhd = masked_attention(query, key, value, mask, self.softmax_scale, dropout_p,
                                  backend=self.backend)
        if is_thd:
            return o_tbhd.reshape(T, H * D)
        return o_tbhd.reshape(T, B, H * D)
