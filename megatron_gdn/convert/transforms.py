"""Tensor transforms between checkpoint layouts; each is a pair of exact inverses.

Legend: h hidden, H / HV GDN key / value heads, K / V their dims, r = HV / H value heads per key
head, W conv taps, np / ng attention query heads / key-value groups, p = np / ng, d attention
head dim, E experts, I expert FFN width.
"""
from typing import List

import torch

from megatron_gdn.convert.mapping import Transform

__all__ = [
    "COPY", "ZERO_CENTRED_NORM", "CONV_DW", "SWIGLU_FC1", "gdn_in_proj_qwen3_next", "gated_qkv",
    "plain_qkv", "experts_fc1", "experts_fc2", "gdn_in_proj_fla", "fla_conv",
]


def _one(fn):
    return lambda tensors: [fn(*tensors)]


COPY = Transform(_one(lambda t: t), _one(lambda t: t), "copy")

# Qwen3-Next's RMSNorm multiplies by (1 + w) in fp32; ours by w. The fp32 sum 1 + w is exact for
# weights stored in bf16 (released checkpoints) and the difference back is exact (Sterbenz), so
# a bf16-representable w survives the round trip bit for bit.
ZERO_CENTRED_NORM = Transform(
    _one(lambda w: 1.0 + w.float()),
    _one(lambda w: w.float() - 1.0),
    "zero-centred RMSNorm: ours = 1 + theirs (fp32)",
)

# nn.Conv1d depthwise weight [D, 1, W] <-> ours [D, W]; same channel order, same tap order
CONV_DW = Transform(_one(lambda w: w[:, 0, :]), _one(lambda w: w[:, None, :]), "conv [D, 1, W] <-> [D, W]")

# SwiGLU: Megatron's fc1 holds [gate; up]
SWIGLU_FC1 = Transform(
    _one(lambda gate, up: torch.cat([gate, up], dim=0)),
    lambda ts: list(ts[0].chunk(2, dim=0)),
    "fc1 = [gate_proj; up_proj]",
)


def gdn_in_proj_qwen3_next(H: int, HV: int, K: int, V: int) -> Transform:
    """Qwen3-Next: in_proj_qkvz rows per key head g = [q_g (K) | k_g (K) | v_g (r V) | z_g (r V)],
    in_proj_ba rows per key head = [b_g (r) | a_g (r)]; ours [q | k | v | z | b | a] by section,
    heads in global order (value head g r + j)."""
    r = HV // H

    def to_ours(ts: List[torch.Tensor]) -> List[torch.Tensor]:
        qkvz, ba = ts
        h = qkvz.shape[-1]
        q, k, v, z = qkvz.view(H, 2 * K + 2 * r * V, h).split([K, K, r * V, r * V], dim=1)
        b, a = ba.view(H, 2 * r, h).split([r, r], dim=1)
        return [torch.cat([x.reshape(-1, h) for x in (q, k, v, z, b, a)], dim=0)]

    def to_theirs(ts: List[torch.Tensor]) -> List[torch.Tensor]:
        (w,) = ts
        h = w.shape[-1]
        q, k, v, z, b, a = w.split([H * K, H * K, HV * V, HV * V, HV, HV], dim=0)
        qkvz = torch.cat([q.view(H, K, h), k.view(H, K, h), v.view(H, r * V, h), z.view(H, r * V, h)], dim=1)
        ba = torch.cat([b.view(H, r, h), a.view(H, r, h)], dim=1)
        return [qkvz.reshape(-1, h), ba.reshape(-1, h)]

    return Transform(to_ours, to_theirs, "per-key-head (qkvz, ba) groups <-> sections [q|k|v|z|b|a]")


def gated_qkv(np_: int, ng: int, d: int) -> Transform:
    """Qwen3-Next gated attention: q_proj rows per head = [q_head (d) | gate_head (d)]; k_proj,
    v_proj [ng d]. Megatron's linear_qkv with attention_output_gate, per group g:
    [q of its p heads | gate of its p heads | k_g | v_g]."""
    p = np_ // ng

    def to_ours(ts):
        qg, k, v = ts
        h = qg.shape[-1]
        qg = qg.view(np_, 2, d, h)
        q, gate = qg[:, 0], qg[:, 1]
        parts = [q.reshape(ng, p * d, h), gate.reshape(ng, p * d, h), k.view(ng, d, h), v.view(ng, d, h)]
        return [torch.cat(parts, dim=1).reshape(-1, h)]

    def to_theirs(ts):
        (w,) = ts
        h = w.shape[-1]
        q, gate, k, v = w.view(ng, 2 * p * d + 2 * d, h).split([p * d, p * d, d, d], dim=1)
        qg = torch.stack([q.reshape(np_, d, h), gate.reshape(np_, d, h)], dim=1)
        return [qg.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]

    return Transform(to_ours, to_theirs, "q_proj [q|gate] per head + k_proj + v_proj <-> linear_qkv per group")


def plain_qkv(np_: int, ng: int, d: int) -> Transform:
    """q_proj, k_proj, v_proj <-> Megatron's linear_qkv, per group g: [q of its p heads | k_g | v_g]."""
    p = np_ // ng

    def to_ours(ts):
        q, k, v = ts
        h = q.shape[-1]
        parts = [q.view(ng, p * d, h), k.view(ng, d, h), v.view(ng, d, h)]
        return [torch.cat(parts, dim=1).reshape(-1, h)]

    def to_theirs(ts):
        (w,) = ts
        h = w.shape[-1]
        q, k, v = w.view(ng, p * d + 2 * d, h).split([p * d, d, d], dim=1)
        return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]

    return Transform(to_ours, to_theirs, "q_proj + k_proj + v_proj <-> linear_qkv per group")


def experts_fc1(E: int) -> Transform:
    """transformers' fused experts.gate_up_proj [E, 2I, h] (rows [gate; up]) <-> E fc1 [2I, h]."""
    return Transform(lambda ts: list(ts[0].unbind(0)), lambda ts: [torch.stack(ts, dim=0)],
                     "experts.gate_up_proj[e] <-> local_experts.e.linear_fc1")


def experts_fc2(E: int) -> Transform:
    """experts.down_proj [E, h, I] <-> E fc2 [h, I]."""
    return Transform(lambda ts: list(ts[0].unbind(0)), lambda ts: [torch.stack(ts, dim=0)],
                     "experts.down_proj[e] <-> local_experts.e.linear_fc2")


def gdn_in_proj_fla(H: int, HV: int, K: int, V: int, has_z: bool = True) -> Transform:
    """fla GatedDeltaNet: separate q_proj [H K], k_proj [H K], v_proj [HV V], g_proj (z)
    [HV V], b_proj (beta logits) [HV], a_proj [HV] <-> ours [q | k | v | z | b | a]."""
    sizes = [H * K, H * K, HV * V, HV * V, HV, HV]

    def to_ours(ts):
        return [torch.cat(ts, dim=0)]

    def to_theirs(ts):
        return list(ts[0].split(sizes, dim=0))

    return Transform(to_ours, to_theirs, "q/k/v/g/b/a_proj <-> sections [q|k|v|z|b|a]")


def fla_conv(H: int, HV: int, K: int, V: int) -> Transform:
    """fla's three ShortConvolutions (q_conv1d, k_conv1d, v_conv1d: [D, 1, W] each) <-> our
    conv_weight [q | k | v channels, W]."""
    sizes = [H * K, H * K, HV * V]

    def to_ours(ts):
        return [torch.cat([t[:, 0, :] for t in ts], dim=0)]

    def to_theirs(ts):
        return [t[:, None, :] for t in ts[0].split(sizes, dim=0)]

    return Transform(to_ours, to_theirs, "q/k/v_conv1d [D, 1, W] <-> conv_weight sections [q|k|v]")
