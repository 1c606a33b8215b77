"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025) as a Megatron-core layer.

`GatedDeltaNet` fills the self-attention slot of a Megatron `TransformerLayer`:

    hidden --in_proj--> [q | k | v | z | b | a]              (column-parallel, this rank's heads)
    q, k, v --short causal conv + SiLU-->                    (per-channel taps, sharded with heads)
    o = chunk_gated_delta_rule(q, k, v, a, b, L2-norm q/k,   (fused: g = -exp(A_log) *
                               A_log, dt_bias, sigmoid b)     softplus(a + dt_bias), beta = sigmoid(b))
    y = RMSNorm_per_head(o) * weight * SiLU(z)               (weight [V], replicated over TP)
    out = out_proj(y)                                        (row-parallel)

Legend: s tokens (sequence), b batch, h hidden, T = s as the kernels' time axis, D channels,
H / HV key / value heads of this rank, K / V key / value head dim, W conv taps.

Tensor parallel: rank r owns key heads [r H, (r+1) H) and value heads [r HV, (r+1) HV) (whole
GVA groups), so the recurrence needs no communication; Megatron's column/row-parallel linears
do the rest (with sequence parallel they all-gather the [s/tp, b, h] input and reduce-scatter
the output). The one replicated parameter, the gated norm's weight, enters the graph through
an identity whose backward all-reduces over TP, so its gradient is the full one on every rank
with or without sequence parallel (no reliance on finalize_model_grads).

Ablations (constructor keywords, default on): use_output_gate=False drops z from in_proj and
normalises without the SiLU(z) gate; use_short_conv=False drops the conv (q, k, v = SiLU of
the projection); use_decay=False is DeltaNet (g = 0 exactly), without `a`, A_log and dt_bias.

Packed sequences (THD, batch 1): `packed_seq_params.cu_seqlens_q(_padded)` resets both the conv
and the recurrence at every boundary.

Context parallel (pg_collection.cp of size > 1): the input is Megatron's zigzag share of the
sequences; the conv takes the halo of the preceding pieces and the recurrence the state
passed from them (megatron_gdn.parallel), so the output is the full-sequence one.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
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
from megatron_gdn.config import CONV_SECTIONS, packed_cu_seqlens, param_device, resolve_gdn_dims
from megatron_gdn.kernels.conv1d import causal_conv1d
from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule
from megatron_gdn.kernels.gated_norm import gated_rmsnorm
from megatron_gdn.parallel import cp_kernels
from megatron_gdn.parallel.zigzag import PACKED_LAYOUTS
from megatron_gdn.section_grads import split_sections


@dataclass
class GatedDeltaNetSubmodules:
    """in_proj: a column-parallel linear (optionally with the input norm fused, TE);
    out_proj: a row-parallel linear."""

    in_proj: Union[ModuleSpec, type] = IdentityOp
    out_proj: Union[ModuleSpec, type] = IdentityOp


class GatedDeltaNet(MegatronModule):
    """The Gated DeltaNet token mixer for the self-attention slot of a TransformerLayer.

    Args:
        config: TransformerConfig; sizes from its `linear_*` fields (see megatron_gdn.config).
        submodules: GatedDeltaNetSubmodules (in_proj, out_proj).
        layer_number: 1-based layer index (as TransformerLayer passes it).
        pg_collection: process groups (tp, cp); defaults to Megatron's global groups.
        conv_bias: add a per-channel bias in the short conv.
        proj_bias: add biases in in_proj / out_proj.
        use_qk_l2norm: L2-normalise q and k per head (the paper's choice).
        use_output_gate: gate the normalised output with SiLU(z); False: no z rows in in_proj,
            plain per-head RMSNorm.
        use_short_conv: the short causal conv on q, k, v; False: q, k, v = SiLU(projection),
            no conv parameters.
        use_decay: the gated decay; False: DeltaNet (g = 0), no `a` rows, A_log or dt_bias.
        A_init_range: A ~ U(A_init_range), A_log = log A (decay rate per value head).
        dt_init_range, dt_init_floor: dt log-uniform in dt_init_range, clamped below at the
            floor; dt_bias = softplus^-1(dt).
        cp_packed_layout: how packed (THD) batches were split over the context-parallel ranks:
            "per_document" (Megatron's default), "whole_pack" (get_batch_on_this_cp_rank with
            use_per_sequence_balancing, e.g. --dataloader-inter-document-masking) or "auto"
            (per document when every document length is a multiple of 2 * CP, else whole pack).
        cp_comm_type, pp_layer_offset, attn_mask_type, model_comm_pgs, name: accepted because
            TransformerLayer (or a spec written for attention) passes them; GDN is causal by
            construction and has no CP communication scheme to choose.
    """

    def __init__(
        self,
        config,
        submodules: GatedDeltaNetSubmodules,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        *,
        conv_bias: bool = False,
        proj_bias: bool = False,
        use_qk_l2norm: bool = True,
        use_output_gate: bool = True,
        use_short_conv: bool = True,
        use_decay: bool = True,
        A_init_range: Tuple[float, float] = (1.0, 16.0),
        dt_init_range: Tuple[float, float] = (1e-3, 1e-1),
        dt_init_floor: float = 1e-4,
        cp_packed_layout: str = "auto",
        cp_comm_type: Optional[str] = None,
        pp_layer_offset: Optional[int] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
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
        tp_size = self.tp_group.size()
        # the CP group's size decides (it is what the state passing communicates over)
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None and config.context_parallel_size > 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size} needs pg_collection.cp"
            )
        self.cp_size = cp_size = self.cp_group.size() if self.cp_group is not None else 1
        for option, value in (("use_output_gate", use_output_gate), ("use_short_conv", use_short_conv),
                              ("use_decay", use_decay)):
            if not isinstance(value, bool):
                raise TypeError(f"{option} must be a bool, got {value!r}")
        if conv_bias and not use_short_conv:
            raise ValueError("conv_bias=True needs use_short_conv=True (no conv, no conv bias)")
        self.use_output_gate = use_output_gate
        self.use_short_conv = use_short_conv
        self.use_decay = use_decay
        self.dims = dataclasses.replace(resolve_gdn_dims(config, tp_size, cp_size),
                                        use_output_gate=use_output_gate, use_decay=use_decay)

        if attn_mask_type not in (None, AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(
                f"attn_mask_type={attn_mask_type}: GatedDeltaNet is causal by construction; "
                "use AttnMaskType.causal or leave it unset"
            )
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        lo, hi = dt_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"dt_init_range must satisfy 0 < low <= high, got {dt_init_range}")
        if not dt_init_floor > 0:
            raise ValueError(f"dt_init_floor must be > 0, got {dt_init_floor}")

        self.layer_number = layer_number
        self.use_qk_l2norm = use_qk_l2norm
        self.A_init_range = A_init_range
        self.dt_init_range = dt_init_range
        self.dt_init_floor = dt_init_floor
        if cp_packed_layout not in PACKED_LAYOUTS:
            raise ValueError(f"cp_packed_layout={cp_packed_layout!r}: expected one of {PACKED_LAYOUTS}")
        self.cp_packed_layout = cp_packed_layout
        self.sequence_parallel = config.sequence_parallel and tp_size > 1
        d = self.dims

        # Megatron's CPU initialisation draws in_proj's whole master weight and gives each rank a
        # contiguous block of rows; our rows are sectioned per rank ([q|k|v|z|b|a] of the rank's
        # heads), so the draw is redone below and cut by sections (TP-independent init)
        cpu_init = config.use_cpu_initialization and config.perform_initialization and tp_size > 1
        rng_before_in_proj = torch.get_rng_state() if cpu_init else None
        self.in_proj = build_module(
            submodules.in_proj,
            d.hidden_size,
            d.in_proj_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=proj_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
            name=(name + ".in_proj") if name is not None else None,
        )

        if rng_before_in_proj is not None:
            self._draw_in_proj_by_sections(rng_before_in_proj)

        device = param_device(config)
        dtype = config.params_dtype
        # the conv taps, A_log and dt_bias of this rank's channels / value heads: TP-sharded
        if use_short_conv:
            self.conv_weight = torch.nn.Parameter(
                torch.empty(d.conv_dim_local_tp, d.conv_kernel_dim, device=device, dtype=dtype)
            )
            tensor_parallel.set_tensor_model_parallel_attributes(self.conv_weight, True, 0, 1)
        else:
            self.conv_weight = None
        if use_short_conv and conv_bias:
            self.conv_bias = torch.nn.Parameter(torch.empty(d.conv_dim_local_tp, device=device, dtype=dtype))
            tensor_parallel.set_tensor_model_parallel_attributes(self.conv_bias, True, 0, 1)
        else:
            self.conv_bias = None
        if use_decay:
            self.A_log = torch.nn.Parameter(torch.empty(d.num_value_heads_local_tp, device=device, dtype=dtype))
            tensor_parallel.set_tensor_model_parallel_attributes(self.A_log, True, 0, 1)
            self.dt_bias = torch.nn.Parameter(torch.empty(d.num_value_heads_local_tp, device=device, dtype=dtype))
            tensor_parallel.set_tensor_model_parallel_attributes(self.dt_bias, True, 0, 1)
        else:
            self.A_log = self.dt_bias = None
        # replicated over TP; its gradient is summed over TP in forward (see module docstring)
        self.out_norm_weight = torch.nn.Parameter(torch.ones(d.value_head_dim, device=device, dtype=dtype))

        self.out_proj = build_module(
            submodules.out_proj,
            d.v_dim,
            d.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=proj_bias,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
            name=(name + ".out_proj") if name is not None else None,
        )
        self.reset_parameters()

    # ----------------------------------------------------------------------------- init
    def _local_rows(self, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        n = full.shape[0] // self.dims.tp_size
        return full[tp_rank * n:(tp_rank + 1) * n]

    @torch.no_grad()
    def _draw_in_proj_by_sections(self, rng_before: torch.Tensor) -> None:
        """Redo Megatron's CPU draw of the global in_proj weight (same generator state, so the
        generator ends where Megatron's draw left it) and keep this rank's rows of each section."""
        d = self.dims
        rng_after = torch.get_rng_state()
        torch.set_rng_state(rng_before)
        master = torch.empty(d.in_proj_dim, d.hidden_size, dtype=torch.float)
        self.config.init_method(master)
        assert torch.equal(torch.get_rng_state(), rng_after), "in_proj init drew differently"
        master = master.to(self.config.params_dtype)
        rank = self.tp_group.rank()
        rows, start = [], 0
        for local in d.in_proj_sections_local_tp:
            rows.append(master[start + rank * local:start + (rank + 1) * local])
            start += local * d.tp_size
        self.in_proj.weight.copy_(torch.cat(rows))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draws every per-head parameter for ALL heads from the CPU generator and keeps this
        rank's rows, so the global initial weights do not depend on the TP size (ranks seeded
        alike draw the same numbers)."""
        self.out_norm_weight.fill_(1.0)
        if not self.config.perform_initialization:
            return
        d = self.dims
        rank = self.tp_group.rank()
        # short conv: torch's Conv1d default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = W
        bound = 1.0 / math.sqrt(d.conv_kernel_dim)
        widths = (d.num_key_heads * d.key_head_dim, d.num_key_heads * d.key_head_dim,
                  d.num_value_heads * d.value_head_dim)
        if self.conv_weight is not None:
            conv = [self._local_rows(torch.empty(w, d.conv_kernel_dim).uniform_(-bound, bound), rank)
                    for w in widths]
            self.conv_weight.copy_(torch.cat(conv))
        if self.conv_bias is not None:
            bias = [self._local_rows(torch.empty(w).uniform_(-bound, bound), rank) for w in widths]
            self.conv_bias.copy_(torch.cat(bias))
        if not self.use_decay:
            return
        # decay rate A ~ U(A_init_range) per value head (Mamba2 parameterisation)
        A = torch.empty(d.num_value_heads, dtype=torch.float64).uniform_(*self.A_init_range)
        self.A_log.copy_(self._local_rows(torch.log(A), rank))
        # time step dt log-uniform in dt_init_range; dt_bias = softplus^-1(dt) = dt + log(1 - e^-dt)
        lo, hi = self.dt_init_range
        u = torch.rand(d.num_value_heads, dtype=torch.float64)
        dt = torch.exp(u * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(self._local_rows(dt + torch.log(-torch.expm1(-dt)), rank))

    # -------------------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
        **kwargs,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden_states: [s, b, h] ([s/tp, b, h] with sequence parallel). The attention mask
        and rotary embeddings that TransformerLayer passes are not used: the recurrence is
        causal and position-aware by itself. Returns (output [s(/tp), b, h], out_proj bias)."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("GatedDeltaNet: inference (decoding) is not implemented yet")
        d = self.dims
        # rows padded to a 16-byte multiple where the width is not (Hopper's matmul kernels
        # instead of Ampere's, aligned_proj.py): a last "pad" section, split off and never read
        proj_sbd, widths = project_sections(self.in_proj, self.config, hidden_states,
                                            d.in_proj_sections_local_tp)
        names = list(d.in_proj_section_names) + ["pad"]
        s, b, _ = proj_sbd.shape
        conv, chunk, cu_seqlens = causal_conv1d, chunk_gated_delta_rule, None
        if self.cp_size > 1:
            # Megatron's zigzag share of the sequences: halo and state passing over the CP group
            conv, chunk = cp_kernels(packed_seq_params, b, s, self.cp_group, self.cp_packed_layout)
        else:
            cu_seqlens = packed_cu_seqlens(packed_seq_params, b, s)

        # the layer stays in Megatron's [s, b] order; the kernels read [b, s] views through
        # their strides, so neither the projection nor the norm output is transposed in memory.
        # The in_proj gradient is one [s, b, D] buffer: the conv and norm backward kernels
        # write their sections' gradients into its slices (the `*_into` hints), no concatenation
        qk, v_dim, hv = d.qk_dim_local_tp, d.v_dim_local_tp, d.num_value_heads_local_tp
        views, section_grads = split_sections(proj_sbd, widths)
        sections = dict(zip(names, views))
        into = {name: i for i, name in enumerate(names)}
        to_bsd = lambda t: t.transpose(0, 1)  # noqa: E731
        q_sbd, k_sbd, v_sbd, beta_logit_sbh = sections["q"], sections["k"], sections["v"], sections["b"]

        if self.use_short_conv:
            # one conv per section: each output is contiguous as the recurrence kernels take it
            # (one conv over q|k|v would need three channel-slice copies, and its backward a cat
            # of dq|dk|dv); the conv reads its strided slice of the projection in place
            widths = [qk, qk, v_dim]
            weights = torch.split(self.conv_weight, widths, dim=0)
            biases = torch.split(self.conv_bias, widths, dim=0) if self.conv_bias is not None else (None,) * 3
            # (the context-parallel conv takes no gradient hint: split's backward copies)
            hints = ({"dx_into": section_grads.into(into[n], to_bsd)} if self.cp_size == 1 else {}
                     for n in ("q", "k", "v"))
            q_btd, k_btd, v_btd = (
                conv(x_sbd.transpose(0, 1), w, bias, activation="silu", cu_seqlens=cu_seqlens, **hint)[0]
                for x_sbd, w, bias, hint in zip((q_sbd, k_sbd, v_sbd), weights, biases, hints)
            )
        else:
            # pointwise, so no halo or document boundary matters (CP and packed alike)
            q_btd, k_btd, v_btd = (F.silu(x_sbd.transpose(0, 1)).contiguous() for x_sbd in (q_sbd, k_sbd, v_sbd))
        q_bthk = q_btd.view(b, s, d.num_key_heads_local_tp, d.key_head_dim)
        k_bthk = k_btd.view(b, s, d.num_key_heads_local_tp, d.key_head_dim)
        v_bthv = v_btd.view(b, s, hv, d.value_head_dim)

        if self.use_decay:
            # A_log / dt_bias enter the kernel in fp32 whatever the parameter dtype (bf16 under
            # Megatron's Float16Module): the decay is exp(-exp(A_log) * softplus(.)), sensitive
            # to rounding of A_log
            g_bth = sections["a"].transpose(0, 1).contiguous()
            A_log, dt_bias = self.A_log.float(), self.dt_bias.float()
        else:
            # DeltaNet: log decay 0 exactly (exp(g) = 1, the state is never decayed)
            g_bth = torch.zeros(b, s, hv, device=proj_sbd.device, dtype=torch.float32)
            A_log = dt_bias = None
        o_bthv, _ = chunk(
            q_bthk, k_bthk, v_bthv, g_bth,
            beta_logit_sbh.transpose(0, 1).contiguous(),
            scale=d.key_head_dim ** -0.5,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm=self.use_qk_l2norm,
            A_log=A_log,
            dt_bias=dt_bias,
            use_beta_sigmoid=True,
        )

        norm_weight = self.out_norm_weight
        if d.tp_size > 1:
            # identity forward, all-reduce backward: each rank holds a partial gradient
            norm_weight = tensor_parallel.copy_to_tensor_model_parallel_region(norm_weight, group=self.tp_group)
        # [s, b, HV, V] views: o transposed, z a slice of the projection; the Triton norm
        # writes y contiguous in this order (out_proj's input, a view) and dx back in o's layout
        eps = self.config.layernorm_epsilon
        if self.use_output_gate:
            z_sbhv = sections["z"].view(s, b, hv, d.value_head_dim)
            z_view = lambda t: t.view(s, b, hv, d.value_head_dim)  # noqa: E731
            y_sbhv = gated_rmsnorm(o_bthv.transpose(0, 1), z_sbhv, norm_weight, eps=eps,
                                   dz_into=section_grads.into(into["z"], z_view))
        else:
            # plain per-head RMSNorm, statistics in fp32 as the gated kernel computes them
            o_sbhv = o_bthv.transpose(0, 1)
            y_sbhv = F.rms_norm(o_sbhv.float(), (d.value_head_dim,), norm_weight.float(), eps).to(o_sbhv.dtype)

        # contiguous already on the Triton path (no copy); the CPU torch path may not be
        y_sbd = y_sbhv.reshape(s, b, v_dim).contiguous()
        out_sbh, out_bias = self.out_proj(y_sbd)
        return out_sbh, out_bias

    def backward_dw(self) -> None:
        """Deferred weight gradients of the linears (config.delay_wgrad_compute)."""
        self.in_proj.backward_dw()
        self.out_proj.backward_dw()

    # ---------------------------------------------------------------------- checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """TP-size independent checkpoint: in_proj.weight is saved as sections q, k, v, z, b, a
        (less z without the output gate, a without the decay) and conv_weight (and conv_bias)
        as q, k, v, each sharded over TP along dim 0; A_log and dt_bias are TP-sharded;
        out_norm_weight is replicated. Parameters an ablation removes are not saved."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        d = self.dims
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        tp_axes = {name: 0 for name in ("conv_weight", "conv_bias", "A_log", "dt_bias")
                   if getattr(self, name) is not None}
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, tp_axes, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(
                module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
            ))

        key = f"{prefix}in_proj.weight"
        sharded[key] = split_sharded_tensor(sharded[key], d.in_proj_section_names, d.in_proj_sections_local_tp)
        key = f"{prefix}in_proj.bias"
        if key in sharded:
            sharded[key] = split_sharded_tensor(sharded[key], d.in_proj_section_names, d.in_proj_sections_local_tp)
        for param in ("conv_weight", "conv_bias"):
            key = f"{prefix}{param}"
            if key in sharded:
                sharded[key] = split_sharded_tensor(sharded[key], CONV_SECTIONS, d.conv_sections_local_tp)
        return sharded
