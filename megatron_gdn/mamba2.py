"""The Mamba2 block (Dao & Gu, ICML 2024) as a Megatron-core mixer, on our own SSD kernel.

`Mamba2Mixer` fills the self-attention slot of a TransformerLayer (as GatedDeltaNet does):

    hidden --in_proj--> [z | x | B | C | dt]                 (column-parallel, this rank's heads)
    x, B, C --short causal conv + SiLU-->                    (per-channel taps, sharded with heads)
    dt = softplus(dt + dt_bias),  g = dt * -exp(A_log)       (per head, fp32)
    y  = chunk_scalar_decay(C, B, x * dt, g) + D * x         (SSD: S_t = e^g_t S + B_t (x dt)_t^T;
                                                              x * dt and D x inside the kernels)
    y  = RMSNorm_per_group(y * SiLU(z)) * norm.weight        (Mamba2's gated norm, gate first)
    out = out_proj(y)                                        (row-parallel)

Legend: s tokens, b batch, h hidden; T = s as the kernels' time axis; NH / NG value heads /
groups of this rank, P head dim, N state dim, W conv taps, D channels.

Parameters have megatron-core 0.19.2 MambaMixer's names, shapes and per-rank layouts
(in_proj.weight rows [z, x, B, C, dt] of this rank, conv1d_weight [D, 1, W] and conv1d_bias
over [x, B, C], dt_bias, A_log and D per head, norm.weight [d_inner], out_proj.weight), so a
state dict moves between the two unchanged; `sharded_state_dict` splits the fused tensors into
the same named sections for TP-size independent checkpoints.

Tensor parallel: rank r owns heads [r NH, (r+1) NH) and groups [r NG, (r+1) NG) (needs
num_groups % tp == 0, as MambaMixer); the norm groups are whole on one rank, so nothing is
replicated and the recurrence needs no communication. Sequence parallel: the column/row-
parallel linears all-gather and reduce-scatter.

Context parallel: the scalar-decay recurrence maps the state entering a token run affinely,
S_out = exp(sum g) S_in + H, so each zigzag piece is summarised by H [NH, N, P] and a scalar
per head; one all-gather passes the summaries, a fold gives every piece its entering state,
o_t += exp(gcum_t) C_t^T S_in (see `chunk_scalar_decay_cp`). Conv halos come from
megatron_gdn.parallel. Packed sequences (THD): cu_seqlens_q(_padded) resets conv and state.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_gdn.aligned_proj import project_sections
from megatron_gdn.checkpoint import split_sharded_tensor
from megatron_gdn.config import packed_cu_seqlens, param_device
from megatron_gdn.kernels.conv1d import causal_conv1d
from megatron_gdn.kernels.gated_norm import gate_then_rmsnorm
from megatron_gdn.kernels.ssd import chunk_scalar_decay
from megatron_gdn.parallel.collectives import all_gather_start
from megatron_gdn.parallel.halo import conv_with_cp_halo
from megatron_gdn.parallel.zigzag import CPLayout, layout_for_layer, piece_owner
from megatron_gdn.section_grads import split_sections

__all__ = ["Mamba2Mixer", "Mamba2MixerSubmodules", "get_mamba2_mixer_spec", "grouped_gated_rmsnorm",
           "chunk_scalar_decay_cp"]

IN_PROJ_SECTIONS = ("z", "x", "B", "C", "dt")
CONV_SECTIONS = ("x", "B", "C")


def grouped_gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int,
                          eps: float, dz_into=None) -> torch.Tensor:
    """Mamba2's gated norm (norm after the gate): u = y * silu(z), normalised over each of
    `groups` equal slices of the last dim, times weight. fp32 math, y's dtype out; the Triton
    kernel on CUDA (`kernels.gated_norm.gate_then_rmsnorm`, z's gradient written through the
    `dz_into` hint), the torch path on the CPU."""
    return gate_then_rmsnorm(y, z, weight, groups, eps, dz_into=dz_into)


class GroupedGatedRMSNorm(torch.nn.Module):
    """Holds `weight` [d_inner_local_tp] under the name MambaMixer's `norm` uses."""

    def __init__(self, dim: int, groups: int, eps: float, device, dtype):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, y: torch.Tensor, z: torch.Tensor, dz_into=None) -> torch.Tensor:
        return grouped_gated_rmsnorm(y, z, self.weight, self.groups, self.eps, dz_into)


# ------------------------------------------------------------------- context parallelism
def _segment_cumsum(g_th: torch.Tensor, cu: List[int]) -> torch.Tensor:
    """Inclusive cumsum of g [T, NH] restarting at every boundary of cu (per segment, not as a
    difference of one long cumsum, which would lose the small exponents to rounding)."""
    return torch.cat([g_th[a:b].cumsum(0) for a, b in zip(cu[:-1], cu[1:])])


def _fold(h_all, a_all, layout: CPLayout, reverse: bool):
    """Forward: the state entering this rank's 2N pieces, S <- a_p S + H_p over global pieces.
    Reverse: the gradient arriving at the end of each local piece, G <- a_p G + D_p from the
    last piece back. h_all [R * 2N, NH, N, P], a_all [R * 2N, NH] -> [2N, NH, N, P]."""
    R = layout.cp_size
    h = h_all.reshape(R, layout.num_seqs, 2, *h_all.shape[1:])
    a = a_all.reshape(R, layout.num_seqs, 2, a_all.shape[-1])
    first, second = layout.local_pieces()
    acc = torch.zeros_like(h[0, :, 0])
    out = [None, None]
    order = range(2 * R - 1, first - 1, -1) if reverse else range(second + 1)
    for p in order:
        if p == first:
            out[0] = acc
        if p == second:
            out[1] = acc
        if (p == first and reverse) or (p == second and not reverse):
            break
        owner, slot = piece_owner(p, R)
        acc = a[owner, :, slot, :, None, None] * acc + h[owner, :, slot]
    return torch.stack(out, dim=1).reshape(layout.num_segments, *h.shape[3:])


class _PassScalarStates(torch.autograd.Function):
    """h [2N, NH, N, P] fp32, a [2N, NH] fp32 (this rank's piece summaries: S_out = a S_in + h)
    -> s_in [2N, NH, N, P]; backward: d s_in -> (dh, da). One all-gather each way."""

    @staticmethod
    def forward(ctx, h, a, layout, group):
        NH, N, P = h.shape[1:]
        _, wait = all_gather_start(torch.cat([h.flatten(2), a.unsqueeze(-1)], dim=-1), group)
        gathered = wait()
        s_in = _fold(gathered[..., :-1].unflatten(-1, (N, P)), gathered[..., -1], layout, reverse=False)
        ctx.save_for_backward(a, s_in)
        ctx.layout, ctx.group = layout, group
        return s_in

    @staticmethod
    def backward(ctx, ds_in):
        a, s_in = ctx.saved_tensors
        N, P = s_in.shape[2:]
        _, wait = all_gather_start(torch.cat([ds_in.float().flatten(2), a.unsqueeze(-1)], dim=-1), ctx.group)
        gathered = wait()
        g_end = _fold(gathered[..., :-1].unflatten(-1, (N, P)), gathered[..., -1], ctx.layout, reverse=True)
        # S_out = a S_in + h: dh = G, da = <G, S_in>
        return g_end, (g_end * s_in).sum((-1, -2)), None, None  # layout, group: not tensors


def chunk_scalar_decay_cp(q, k, v, g, layout: CPLayout, group, scale: Optional[float] = None) -> torch.Tensor:
    """chunk_scalar_decay over sequences spread over the context-parallel group (zigzag).

    q, k: [B, T, NG, N]; v: [B, T, NH, P]; g: [B, T, NH]: this rank's tokens in the layout
    `layout` (dense rows or one packed row). Returns o [B, T, NH, P], equal to the output of
    the full sequences at these tokens (zero state at every sequence start)."""
    B, T = q.shape[:2]
    if B * T != layout.local_tokens:
        raise ValueError(f"q has {B} x {T} tokens but the CP layout describes {layout.local_tokens}")
    scale = 1.0 if scale is None else float(scale)
    q1, k1, v1, g1 = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g))
    subs, cu = layout.sub_segments, layout.sub_cu
    device = q.device
    o0, h_sub = chunk_scalar_decay(q1, k1, v1, g1, scale, None, True,
                                   torch.tensor(cu, dtype=torch.int32, device=device))
    NH, N, P = h_sub.shape[1:]
    gcum = _segment_cumsum(g1[0].float(), cu)                                  # [T, NH]
    a_sub = torch.stack([gcum[s.end - 1 - cu[0]] for s in subs]).exp() if subs else gcum.new_zeros(0, NH)
    cont = torch.tensor([float(s.continues) for s in subs], device=device)
    last = {s.local_piece: i for i, s in enumerate(subs)}
    pieces = torch.tensor(sorted(last), dtype=torch.long, device=device)
    rows = torch.tensor([last[p] for p in sorted(last)], dtype=torch.long, device=device)
    # a piece's map is its last sub-segment's; a document start in the piece cuts the chain
    # (a = 0); an empty piece passes the state on (h = 0, a = 1)
    h = h_sub.new_zeros(layout.num_segments, NH, N, P).index_copy(0, pieces, h_sub[rows])
    a = gcum.new_ones(layout.num_segments, NH).index_copy(0, pieces, (a_sub * cont[:, None])[rows])
    s_in = _PassScalarStates.apply(h, a, layout, group)
    owner = torch.tensor([s.local_piece for s in subs], dtype=torch.long, device=device)
    s_in_sub = s_in.index_select(0, owner) * cont[:, None, None, None]
    # o_t += scale exp(gcum_t) C_t^T S_in, C of the group of each head
    q_h = q1[0].float().repeat_interleave(NH // q.shape[2], dim=1) * (scale * gcum.exp()).unsqueeze(-1)
    parts = [torch.einsum("thn,hnp->thp", q_h[s.start - cu[0]:s.end - cu[0]], s_in_sub[i])
             for i, s in enumerate(subs)]
    o = o0[0].float() + torch.cat(parts)
    return o.to(v.dtype).reshape(B, T, NH, P)


# ------------------------------------------------------------------------------- the mixer
@dataclass
class Mamba2MixerSubmodules:
    """in_proj: a column-parallel linear; out_proj: a row-parallel linear."""

    in_proj: Union[ModuleSpec, type] = IdentityOp
    out_proj: Union[ModuleSpec, type] = IdentityOp


class Mamba2Mixer(MegatronModule):
    """Mamba2 token mixer for the self-attention slot of a TransformerLayer.

    Args:
        config: TransformerConfig; sizes default to its mamba_* fields (mamba_state_dim,
            mamba_head_dim, mamba_num_groups, mamba_num_heads) as for MambaMixer.
        submodules: Mamba2MixerSubmodules (in_proj, out_proj).
        layer_number: 1-based layer index; pg_collection: process groups (tp, cp).
        state_dim, head_dim, num_groups, num_heads: override the config (the YAML section's
            names); expand: d_inner = expand * hidden_size when num_heads is not given;
            conv_kernel: W (MambaMixer's d_conv).
        A_init_range, dt_min, dt_max, dt_init_floor, D_has_hdim: as MambaMixer.
        norm_eps: the gated norm's epsilon (MambaMixer: 1e-5).
        cp_comm_type, pp_layer_offset, attn_mask_type, model_comm_pgs, name: accepted because
            TransformerLayer passes them; not used.
    """

    def __init__(
        self,
        config,
        submodules: Mamba2MixerSubmodules,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        *,
        state_dim: Optional[int] = None,
        head_dim: Optional[int] = None,
        num_groups: Optional[int] = None,
        num_heads: Optional[int] = None,
        expand: int = 2,
        conv_kernel: int = 4,
        A_init_range: Tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        D_has_hdim: bool = False,
        norm_eps: float = 1e-5,
        cp_comm_type: Optional[str] = None,
        pp_layer_offset: Optional[int] = None,
        attn_mask_type=None,
        model_comm_pgs: Optional[ProcessGroupCollection] = None,
        name: Optional[str] = None,
    ):
        super().__init__(config)
        if pg_collection is None:
            pg_collection = model_comm_pgs
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        tp = self.tp_group.size()

        self.d_model = config.hidden_size
        self.d_state = state_dim if state_dim is not None else config.mamba_state_dim
        self.headdim = head_dim if head_dim is not None else config.mamba_head_dim
        self.ngroups = num_groups if num_groups is not None else config.mamba_num_groups
        heads = num_heads if num_heads is not None else config.mamba_num_heads
        if heads is None:
            if (expand * self.d_model) % self.headdim:
                raise ValueError(f"head_dim={self.headdim} does not divide expand x hidden_size = "
                                 f"{expand * self.d_model}")
            heads = expand * self.d_model // self.headdim
        self.nheads = heads
        self.d_inner = heads * self.headdim
        for field, value in (("num_heads", heads), ("num_groups", self.ngroups)):
            if value % tp:
                raise ValueError(f"{field}={value} is not divisible by the tensor-parallel size {tp}")
        if heads % self.ngroups:
            raise ValueError(f"num_heads={heads} is not divisible by num_groups={self.ngroups}")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.nheads_local_tp = heads // tp
        self.ngroups_local_tp = self.ngroups // tp
        self.d_inner_local_tp = self.d_inner // tp
        self.conv_kernel = conv_kernel
        self.A_init_range, self.dt_range, self.dt_init_floor = A_init_range, (dt_min, dt_max), dt_init_floor
        self.D_has_hdim = D_has_hdim
        self.layer_number = layer_number
        gs = self.ngroups_local_tp * self.d_state
        self.in_proj_sections_local_tp = (self.d_inner_local_tp, self.d_inner_local_tp, gs, gs,
                                          self.nheads_local_tp)
        self.conv_sections_local_tp = (self.d_inner_local_tp, gs, gs)
        conv_dim = sum(self.conv_sections_local_tp)

        self.in_proj = build_module(
            submodules.in_proj, self.d_model, self.d_inner * 2 + 2 * self.ngroups * self.d_state + heads,
            config=config, init_method=config.init_method, gather_output=False, bias=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group,
            name=(name + ".in_proj") if name is not None else None,
        )
        device, dtype = param_device(config), config.params_dtype
        self.conv1d_weight = torch.nn.Parameter(torch.empty(conv_dim, 1, conv_kernel, device=device, dtype=dtype))
        self.conv1d_bias = torch.nn.Parameter(torch.empty(conv_dim, device=device, dtype=dtype))
        self.dt_bias = torch.nn.Parameter(torch.empty(self.nheads_local_tp, device=device, dtype=dtype))
        # A_log and D stay fp32 whatever params_dtype, as in MambaMixer
        self.A_log = torch.nn.Parameter(torch.empty(self.nheads_local_tp, device=device, dtype=torch.float32))
        d_len = self.d_inner_local_tp if D_has_hdim else self.nheads_local_tp
        self.D = torch.nn.Parameter(torch.ones(d_len, device=device, dtype=torch.float32))
        for p in (self.conv1d_weight, self.conv1d_bias, self.dt_bias, self.A_log, self.D):
            tensor_parallel.set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.norm = GroupedGatedRMSNorm(self.d_inner_local_tp, self.ngroups_local_tp, norm_eps, device, dtype)
        self.out_proj = build_module(
            submodules.out_proj, self.d_inner, self.d_model, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=self.tp_group,
            name=(name + ".out_proj") if name is not None else None,
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MambaMixer's initialisation, drawn for ALL heads / channels from the CPU generator
        and sliced to this rank, so the global weights do not depend on the TP size."""
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)
        if not self.config.perform_initialization:
            return
        tp, rank = self.tp_group.size(), self.tp_group.rank()

        def local(full):
            n = full.shape[0] // tp
            return full[rank * n:(rank + 1) * n]

        W = self.conv_kernel
        # nn.Conv1d's default init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(W)) for both
        bound = 1.0 / math.sqrt(W)
        widths = (self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state)
        self.conv1d_weight.copy_(torch.cat(
            [local(torch.empty(w, 1, W).uniform_(-bound, bound)) for w in widths]))
        self.conv1d_bias.copy_(torch.cat([local(torch.empty(w).uniform_(-bound, bound)) for w in widths]))
        lo, hi = self.dt_range
        u = torch.rand(self.nheads, dtype=torch.float64)
        dt = torch.exp(u * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(local(dt + torch.log(-torch.expm1(-dt))))
        A = torch.empty(self.nheads, dtype=torch.float64).uniform_(*self.A_init_range)
        self.A_log.copy_(local(torch.log(A)))

    def _kernels(self, packed_seq_params, b: int, s: int):
        """(conv, ssd): the plain kernels, or both with this rank's CP layout bound in."""
        cp = self.cp_group
        if cp is None or cp.size() == 1:
            cu = packed_cu_seqlens(packed_seq_params, b, s)

            def conv(x, weight, bias, dx_into=None):
                return causal_conv1d(x, weight, bias, activation="silu", cu_seqlens=cu, dx_into=dx_into)[0]

            def ssd(q, k, x, dt, g, D):
                # v = x dt and the skip D x inside the kernels (v_scale, d_skip): no product
                # or gradient of either is written
                return chunk_scalar_decay(q, k, x, g, 1.0, cu_seqlens=cu, v_scale=dt, d_skip=D)[0]

            return conv, ssd
        layout = layout_for_layer(packed_seq_params, b, s, cp)

        def conv_cp(x, weight, bias, dx_into=None):
            # no gradient hint under CP: split_sections' backward copies this section
            return conv_with_cp_halo(x, weight, bias, "silu", layout, cp)

        def ssd_cp(q, k, x, dt, g, D):
            v = (x.float() * dt.unsqueeze(-1)).to(x.dtype)
            y = chunk_scalar_decay_cp(q, k, v, g, layout, cp, 1.0)
            return (y.float() + D.view(D.shape[0], -1) * x.float()).to(x.dtype)

        return conv_cp, ssd_cp

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, *, inference_params=None, **kwargs):
        """hidden_states: [s, b, h] ([s/tp, b, h] with sequence parallel). Returns (output
        [s(/tp), b, h], out_proj bias). Mask and rotary embeddings are not used."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("Mamba2Mixer: inference through Megatron's contexts is not "
                                      "implemented; kernels.ssd.scalar_decay_step is the decoding step")
        nh, ng, P, N = self.nheads_local_tp, self.ngroups_local_tp, self.headdim, self.d_state
        # rows padded to a 16-byte multiple where the width is not (aligned_proj.py)
        proj_sbd, widths = project_sections(self.in_proj, self.config, hidden_states,
                                            [self.d_inner_local_tp, sum(self.conv_sections_local_tp), nh])
        s, b, _ = proj_sbd.shape
        conv, ssd = self._kernels(packed_seq_params, b, s)

        # in_proj's gradient in one buffer: the conv and norm backward kernels write the xBC
        # and z sections' slices (section_grads.py); dt arrives from torch ops and is copied in
        views, section_grads = split_sections(proj_sbd, widths)
        z_btd, xbc_btd, dt_bth = (v.transpose(0, 1) for v in views[:3])
        xbc_btd = conv(xbc_btd, self.conv1d_weight.squeeze(1), self.conv1d_bias,
                       dx_into=section_grads.into(1, lambda t: t.transpose(0, 1)))
        x_btd, B_btd, C_btd = torch.split(xbc_btd, list(self.conv_sections_local_tp), dim=-1)
        x_bthp = x_btd.reshape(b, s, nh, P)

        # dt, A and the decay in fp32 (MambaMixer keeps A_log fp32; dt_bias may be bf16)
        dt_bth = F.softplus(dt_bth.float() + self.dt_bias.float())
        g_bth = dt_bth * -torch.exp(self.A_log.float())
        D = self.D.view(nh, P) if self.D_has_hdim else self.D
        y_bthp = ssd(C_btd.reshape(b, s, ng, N), B_btd.reshape(b, s, ng, N), x_bthp, dt_bth, g_bth, D)

        y_btd = self.norm(y_bthp.reshape(b, s, self.d_inner_local_tp), z_btd,
                          dz_into=section_grads.into(0, lambda t: t.transpose(0, 1)))
        out_sbh, out_bias = self.out_proj(y_btd.transpose(0, 1).contiguous())
        return out_sbh, out_bias

    def backward_dw(self) -> None:
        self.in_proj.backward_dw()
        self.out_proj.backward_dw()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """TP-size independent checkpoint: in_proj.weight saved as sections z, x, B, C, dt and
        conv1d_weight / conv1d_bias as x, B, C, each sharded over TP along dim 0; dt_bias,
        A_log, D, norm.weight TP-sharded."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        tp_axes = {name: 0 for name in ("conv1d_weight", "conv1d_bias", "dt_bias", "A_log", "D")}
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, tp_axes, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            if name == "norm":
                sharded.update(make_sharded_tensors_for_checkpoint(
                    module.state_dict(keep_vars=True), f"{prefix}norm.", {"weight": 0}, sharded_offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]))
                continue
            sharded.update(sharded_state_dict_default(
                module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))
        key = f"{prefix}in_proj.weight"
        sharded[key] = split_sharded_tensor(sharded[key], IN_PROJ_SECTIONS, self.in_proj_sections_local_tp)
        for param in ("conv1d_weight", "conv1d_bias"):
            key = f"{prefix}{param}"
            sharded[key] = split_sharded_tensor(sharded[key], CONV_SECTIONS, self.conv_sections_local_tp)
        return sharded


def get_mamba2_mixer_spec(**mamba2_params) -> ModuleSpec:
    """ModuleSpec of the Mamba2 mixer with Megatron's local column/row-parallel linears;
    `mamba2_params` go to Mamba2Mixer's constructor (state_dim, head_dim, num_groups, expand,
    conv_kernel, ...)."""
    from megatron.core.models.backends import LocalSpecProvider

    provider = LocalSpecProvider()
    return ModuleSpec(
        module=Mamba2Mixer,
        params=dict(mamba2_params),
        submodules=Mamba2MixerSubmodules(in_proj=provider.column_parallel_linear(),
                                         out_proj=provider.row_parallel_linear()),
    )
