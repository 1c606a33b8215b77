"""Prefill and one-token decoding steps of the token mixers, as functions over a built layer's
own parameters and submodules (the Megatron layers' forwards have no inference path).

Legend: T packed prompt tokens (all prompts of the batch back to back), N = B sequences, h
hidden, H / HV key / value heads, K / V head dims, D conv channels, W conv taps, NH / NG
Mamba2 heads / B-C groups, P Mamba2 head dim, Ns SSM state dim, np / ng query heads /
key-value groups, d attention head dim, C cache slots.

Gated DeltaNet (megatron_gdn.layer.GatedDeltaNet):
    prefill  packed [T, 1, h] with cu_seqlens: causal_conv1d -> final conv state [N, D, W-1],
             chunk_gated_delta_rule -> final recurrent state [N, HV, K, V] (fp32)
    decode   [1, B, h]: causal_conv1d_update (conv state in place), then
             fused_recurrent_gated_delta_rule with inplace_state (recurrent state in place)
The state per sequence is constant in the context length: that is the point of the layer.

Mamba2 (megatron_gdn.mamba2.Mamba2Mixer), the same shape with scalar decay:
    prefill  packed [T, 1, h]: causal_conv1d over [x | B | C] -> final conv state [N, D, W-1],
             chunk_scalar_decay (C as q, B as k, x dt as v, g = dt A) -> final SSD state
             [N, NH, Ns, P] (fp32; Ns the SSM state dim)
    decode   [1, B, h]: causal_conv1d_update, then scalar_decay_step (state in place; a torch
             step on every device, there is no Triton decoding kernel for it yet)

Softmax attention (Megatron SelfAttention with our SDPACoreAttention): q/k/v (+ output gate,
q/k norms) from the layer's own get_query_key_value_tensors, RoPE at each token's position,
a KV cache of C slots per sequence (C = the longest context for full attention, C = window for
sliding-window attention: slot = position mod C, so a window-sized ring buffer suffices since a
query at position t sees keys t - window < s <= t), SDPA, the gate, linear_proj.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_gdn.kernels.conv1d import causal_conv1d, causal_conv1d_update
from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from megatron_gdn.kernels.gated_norm import gated_rmsnorm
from megatron_gdn.kernels.ssd import chunk_scalar_decay, scalar_decay_step

__all__ = ["GDNState", "Mamba2State", "KVCache", "gdn_prefill", "gdn_decode", "mamba2_prefill",
           "mamba2_decode", "attention_prefill", "attention_decode", "rope_table"]


@dataclass
class GDNState:
    """conv: [B, D, W-1] (the conv input dtype), recurrent: [B, HV, K, V] float32."""

    conv: torch.Tensor
    recurrent: torch.Tensor

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * self.recurrent.element_size()


@dataclass
class Mamba2State:
    """conv: [B, D, W-1] over the [x | B | C] channels (the conv input dtype), ssd: [B, NH, Ns, P]
    float32."""

    conv: torch.Tensor
    ssd: torch.Tensor

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssd.numel() * self.ssd.element_size()


@dataclass
class KVCache:
    """k, v: [B, C, ng, d]; pos: [B, C] int64 position held by each slot (-1: empty);
    window: None (full attention) or the SWA window."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    window: Optional[int]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


# ------------------------------------------------------------------------------ Gated DeltaNet
def _gdn_project(layer, hidden_sbh):
    for option in ("use_output_gate", "use_short_conv", "use_decay"):
        if not getattr(layer, option):
            raise NotImplementedError(
                f"generation: GatedDeltaNet with {option}=False (an ablation variant) has no "
                "decoding path yet"
            )
    d = layer.dims
    proj_sbd, _ = layer.in_proj(hidden_sbh)
    proj_bsd = proj_sbd.transpose(0, 1)
    qk, v_dim, hv = d.qk_dim_local_tp, d.v_dim_local_tp, d.num_value_heads_local_tp
    return torch.split(proj_bsd, [2 * qk + v_dim, v_dim, hv, hv], dim=-1)


def _gdn_output(layer, o_bthv, z_btd):
    d = layer.dims
    b, s = o_bthv.shape[:2]
    z_bthv = z_btd.reshape(b, s, d.num_value_heads_local_tp, d.value_head_dim)
    y_bthv = gated_rmsnorm(o_bthv, z_bthv, layer.out_norm_weight, eps=layer.config.layernorm_epsilon)
    y_sbd = y_bthv.reshape(b, s, -1).transpose(0, 1).contiguous()
    out_sbh, bias = layer.out_proj(y_sbd)
    return out_sbh if bias is None else out_sbh + bias


def _gdn_qkv(layer, qkv_btd):
    d = layer.dims
    b, s = qkv_btd.shape[:2]
    qk = d.qk_dim_local_tp
    q, k, v = torch.split(qkv_btd, [qk, qk, d.v_dim_local_tp], dim=-1)
    return (q.reshape(b, s, d.num_key_heads_local_tp, d.key_head_dim),
            k.reshape(b, s, d.num_key_heads_local_tp, d.key_head_dim),
            v.reshape(b, s, d.num_value_heads_local_tp, d.value_head_dim))


def _gdn_kernel_options(layer):
    return dict(scale=layer.dims.key_head_dim ** -0.5, use_qk_l2norm=layer.use_qk_l2norm,
                A_log=layer.A_log.float(), dt_bias=layer.dt_bias.float(), use_beta_sigmoid=True)


def gdn_prefill(layer, hidden_t1h: torch.Tensor, cu_seqlens: torch.Tensor):
    """Packed prompts [T, 1, h] -> (output [T, 1, h], GDNState of the N sequences)."""
    qkv_btd, z_btd, beta_bth, a_bth = _gdn_project(layer, hidden_t1h)
    qkv_btd, conv_state = causal_conv1d(qkv_btd, layer.conv_weight, layer.conv_bias, activation="silu",
                                        output_final_state=True, cu_seqlens=cu_seqlens)
    q, k, v = _gdn_qkv(layer, qkv_btd)
    o_bthv, state = chunk_gated_delta_rule(q, k, v, a_bth.contiguous(), beta_bth.contiguous(),
                                           output_final_state=True, cu_seqlens=cu_seqlens,
                                           **_gdn_kernel_options(layer))
    return _gdn_output(layer, o_bthv, z_btd), GDNState(conv_state.contiguous(), state.contiguous())


def gdn_decode(layer, hidden_1bh: torch.Tensor, state: GDNState) -> torch.Tensor:
    """One token per sequence [1, B, h] -> output [1, B, h]; `state` is updated in place."""
    qkv_btd, z_btd, beta_bth, a_bth = _gdn_project(layer, hidden_1bh)
    qkv_bd = causal_conv1d_update(qkv_btd[:, 0].contiguous(), state.conv, layer.conv_weight, layer.conv_bias,
                                  activation="silu")
    q, k, v = _gdn_qkv(layer, qkv_bd[:, None])
    o_bthv, _ = fused_recurrent_gated_delta_rule(q, k, v, a_bth.contiguous(), beta_bth.contiguous(),
                                                 initial_state=state.recurrent, inplace_state=True,
                                                 **_gdn_kernel_options(layer))
    return _gdn_output(layer, o_bthv, z_btd)


# ------------------------------------------------------------------------------------- Mamba2
def _mamba2_project(layer, hidden_sbh):
    """[s, b, h] -> z [b, s, d_inner], xBC [b, s, D] (before the conv), dt [b, s, NH]."""
    proj_sbd, _ = layer.in_proj(hidden_sbh)
    return torch.split(proj_sbd.transpose(0, 1),
                       [layer.d_inner_local_tp, sum(layer.conv_sections_local_tp), layer.nheads_local_tp], dim=-1)


def _mamba2_ssd_inputs(layer, xbc_btd, dt_bth):
    """The SSD's q = C [b, s, NG, Ns], k = B, v = x dt [b, s, NH, P], g = dt A [b, s, NH] fp32,
    and x [b, s, NH, P] for the D skip; the same fp32 math as Mamba2Mixer.forward."""
    b, s = xbc_btd.shape[:2]
    nh, ng, P, N = layer.nheads_local_tp, layer.ngroups_local_tp, layer.headdim, layer.d_state
    x_btd, B_btd, C_btd = torch.split(xbc_btd, list(layer.conv_sections_local_tp), dim=-1)
    x_bthp = x_btd.reshape(b, s, nh, P)
    dt_bth = F.softplus(dt_bth.float() + layer.dt_bias.float())
    g_bth = dt_bth * -torch.exp(layer.A_log.float())
    v_bthp = (x_bthp.float() * dt_bth.unsqueeze(-1)).to(x_bthp.dtype)
    return C_btd.reshape(b, s, ng, N), B_btd.reshape(b, s, ng, N), v_bthp, g_bth, x_bthp


def _mamba2_output(layer, y_bthp, x_bthp, z_btd):
    b, s, nh, P = y_bthp.shape
    D = layer.D.float().view(nh, P) if layer.D_has_hdim else layer.D.float().view(nh, 1)
    y_bthp = (y_bthp.float() + D * x_bthp.float()).to(x_bthp.dtype)
    y_btd = layer.norm(y_bthp.reshape(b, s, layer.d_inner_local_tp), z_btd)
    out_sbh, bias = layer.out_proj(y_btd.transpose(0, 1).contiguous())
    return out_sbh if bias is None else out_sbh + bias


def mamba2_prefill(layer, hidden_t1h: torch.Tensor, cu_seqlens: torch.Tensor):
    """Packed prompts [T, 1, h] -> (output [T, 1, h], Mamba2State of the N sequences)."""
    z_btd, xbc_btd, dt_bth = _mamba2_project(layer, hidden_t1h)
    xbc_btd, conv_state = causal_conv1d(xbc_btd, layer.conv1d_weight.squeeze(1), layer.conv1d_bias,
                                        activation="silu", output_final_state=True, cu_seqlens=cu_seqlens)
    q, k, v, g, x_bthp = _mamba2_ssd_inputs(layer, xbc_btd, dt_bth)
    y_bthp, ssd_state = chunk_scalar_decay(q, k, v, g, 1.0, None, True, cu_seqlens)
    return _mamba2_output(layer, y_bthp, x_bthp, z_btd), Mamba2State(conv_state.contiguous(),
                                                                      ssd_state.contiguous())


def mamba2_decode(layer, hidden_1bh: torch.Tensor, state: Mamba2State) -> torch.Tensor:
    """One token per sequence [1, B, h] -> output [1, B, h]; `state` is updated in place."""
    z_btd, xbc_btd, dt_bth = _mamba2_project(layer, hidden_1bh)
    xbc_bd = causal_conv1d_update(xbc_btd[:, 0].contiguous(), state.conv, layer.conv1d_weight.squeeze(1),
                                  layer.conv1d_bias, activation="silu")
    q, k, v, g, x_bthp = _mamba2_ssd_inputs(layer, xbc_bd[:, None], dt_bth)
    y_bhp, _ = scalar_decay_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state.ssd, 1.0)
    return _mamba2_output(layer, y_bhp[:, None], x_bthp, z_btd)


# ----------------------------------------------------------------------------------- attention
def rope_table(model, positions: torch.Tensor) -> Optional[torch.Tensor]:
    """Rotary angles [n, 1, 1, rot] of `positions` [n] from the GPTModel's RotaryEmbedding
    (rotate-half layout: the frequencies twice), or None without RoPE."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return None
    if model.config.rotary_interleaved:
        raise ValueError("rotary_interleaved=True is not supported by generation")
    # Megatron keeps inv_freq as a plain attribute: it stays where the model was built (the CPU
    # with use_cpu_initialization) when the module moves to the GPU
    inv_freq = rotary.inv_freq.to(device=positions.device, dtype=torch.float32)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None]
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


def _apply_rope(t_sbnd: torch.Tensor, angles: Optional[torch.Tensor]) -> torch.Tensor:
    if angles is None:
        return t_sbnd
    rot = angles.shape[-1]
    t_rot, t_pass = t_sbnd[..., :rot], t_sbnd[..., rot:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = t_rot * angles.cos().to(t_rot.dtype) + rotated * angles.sin().to(t_rot.dtype)
    return torch.cat([out, t_pass], dim=-1)


def _attention_qkv(attn, hidden_sbh):
    gated = attn.config.attention_output_gate
    out = attn.get_query_key_value_tensors(hidden_sbh, None, output_gate=gated, split_qkv=True)
    if gated:
        return out
    return (*out, None)


def _attention_output(attn, core_sbnd, gate):
    s, b = core_sbnd.shape[:2]
    if gate is not None:
        core_sbnd = core_sbnd * torch.sigmoid(gate.reshape(core_sbnd.shape).float()).to(core_sbnd.dtype)
    out, bias = attn.linear_proj(core_sbnd.reshape(s, b, -1))
    return out if bias is None else out + bias


def _window(attn) -> Optional[int]:
    return getattr(attn.core_attention, "window", None)


def _scale(attn) -> float:
    return float(getattr(attn.core_attention, "softmax_scale", attn.hidden_size_per_attention_head ** -0.5))


def attention_prefill(model, attn, hidden_t1h, cu_seqlens, positions, capacity: int):
    """Packed prompts [T, 1, h] -> (output [T, 1, h], KVCache with each sequence's last
    min(length, C) keys; C = capacity for full attention, the window for SWA)."""
    q, k, v, gate = _attention_qkv(attn, hidden_t1h)                 # [T, 1, np|ng, d]
    angles = rope_table(model, positions)
    q, k = _apply_rope(q, angles), _apply_rope(k, angles)
    T = q.shape[0]
    window = _window(attn)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(positions.device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=positions.device), lengths)
    allowed = (doc[:, None] == doc[None, :]) & (positions[None, :] <= positions[:, None])
    if window is not None:
        allowed &= (positions[:, None] - positions[None, :]) < window
    p = q.shape[2] // k.shape[2]
    q_hts = q[:, 0].transpose(0, 1)
    k_hts = k[:, 0].repeat_interleave(p, dim=1).transpose(0, 1)
    v_hts = v[:, 0].repeat_interleave(p, dim=1).transpose(0, 1)
    o = F.scaled_dot_product_attention(q_hts, k_hts, v_hts, attn_mask=allowed.to(q.device), scale=_scale(attn))
    out = _attention_output(attn, o.transpose(0, 1)[:, None], gate)

    N = len(cu_seqlens) - 1
    C = capacity if window is None else window
    ng, d = k.shape[2], k.shape[3]
    cache = KVCache(k.new_zeros(N, C, ng, d), v.new_zeros(N, C, ng, d),
                    torch.full((N, C), -1, dtype=torch.long, device=k.device), window)
    for n in range(N):
        lo, hi = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
        if hi - lo > capacity and window is None:
            raise ValueError(f"capacity={capacity} is smaller than prompt {n} ({hi - lo} tokens)")
        lo = max(lo, hi - C)
        slots = positions[lo:hi] % C
        cache.k[n, slots] = k[lo:hi, 0]
        cache.v[n, slots] = v[lo:hi, 0]
        cache.pos[n, slots] = positions[lo:hi].to(cache.pos.device)
    return out, cache


def attention_decode(model, attn, hidden_1bh, positions, cache: KVCache) -> torch.Tensor:
    """One token per sequence [1, B, h] at `positions` [B] -> output [1, B, h]; the token's key
    and value enter the cache first (slot position mod C)."""
    q, k, v, gate = _attention_qkv(attn, hidden_1bh)                 # [1, B, np|ng, d]
    angles = rope_table(model, positions)                            # [B, 1, 1, rot]
    if angles is not None:
        angles = angles.transpose(0, 1)                              # [1, B, 1, rot]
    q, k = _apply_rope(q, angles), _apply_rope(k, angles)
    B, C = cache.pos.shape
    if cache.window is None and int(positions.max()) >= C:
        raise ValueError(f"the KV cache holds {C} tokens; position {int(positions.max())} does not fit")
    rows = torch.arange(B, device=cache.pos.device)
    slots = positions.to(cache.pos.device) % C
    cache.k[rows, slots] = k[0]
    cache.v[rows, slots] = v[0]
    cache.pos[rows, slots] = positions.to(cache.pos.device)
    allowed = (cache.pos >= 0) & (cache.pos <= positions[:, None])
    if cache.window is not None:
        allowed &= (positions[:, None] - cache.pos) < cache.window
    q_bh1d = q[0][:, :, None]                                        # [B, np, 1, d]
    k_bgcd = cache.k.transpose(1, 2)                                 # [B, ng, C, d], no copy
    v_bgcd = cache.v.transpose(1, 2)
    o = F.scaled_dot_product_attention(q_bh1d, k_bgcd, v_bgcd, attn_mask=allowed[:, None, None, :],
                                       scale=_scale(attn), enable_gqa=q.shape[2] != k.shape[2])
    return _attention_output(attn, o[:, :, 0][None], gate)
