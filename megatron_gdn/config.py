"""The sizes of one Gated DeltaNet layer, resolved from Megatron's TransformerConfig and checked.

Head counts and dims come from TransformerConfig's `linear_*` fields (so the
`--linear-num-key-heads`, `--linear-num-value-heads`, `--linear-key-head-dim`,
`--linear-value-head-dim` and `--linear-conv-kernel-dim` flags drive them). A field set to
None falls back to the attention sizes of the same config (key heads = num_attention_heads,
value heads = key heads, head dims = kv_channels, conv kernel 4).

Every check happens here, once, at construction: a bad config fails before any weight is
allocated, with a ValueError naming the field and its value.

Per-rank sizes carry the suffix `_local_tp`. Each tensor-parallel rank owns whole key-head
groups: key heads [r * H/tp, (r+1) * H/tp) and their value heads [r * HV/tp, (r+1) * HV/tp)
(value head i reads key head i // (HV // H), so the groups stay on one rank).
"""
from dataclasses import dataclass
from typing import Tuple

import torch

# the chunk kernel keeps a K x V block of the state on chip (kernels/gated_delta_rule)
MAX_KEY_HEAD_DIM = 256
MAX_VALUE_HEAD_DIM = 512
# the short-conv kernels (kernels/conv1d) support kernels of 2..8 taps
MIN_CONV_KERNEL_DIM = 2
MAX_CONV_KERNEL_DIM = 8

IN_PROJ_SECTIONS = ("q", "k", "v", "z", "b", "a")
CONV_SECTIONS = ("q", "k", "v")


@dataclass(frozen=True)
class GDNDims:
    hidden_size: int
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel_dim: int
    tp_size: int
    # ablation options of the layer (GatedDeltaNet's keywords): without the output gate in_proj
    # has no z rows, without the decay no `a` rows
    use_output_gate: bool = True
    use_decay: bool = True

    @property
    def num_key_heads_local_tp(self) -> int:
        return self.num_key_heads // self.tp_size

    @property
    def num_value_heads_local_tp(self) -> int:
        return self.num_value_heads // self.tp_size

    @property
    def value_heads_per_key_head(self) -> int:
        return self.num_value_heads // self.num_key_heads

    @property
    def qk_dim_local_tp(self) -> int:
        return self.num_key_heads_local_tp * self.key_head_dim

    @property
    def v_dim_local_tp(self) -> int:
        return self.num_value_heads_local_tp * self.value_head_dim

    @property
    def conv_sections_local_tp(self) -> Tuple[int, ...]:
        """Channel counts of the conv's q, k, v sections on one rank."""
        return (self.qk_dim_local_tp, self.qk_dim_local_tp, self.v_dim_local_tp)

    @property
    def conv_dim_local_tp(self) -> int:
        return sum(self.conv_sections_local_tp)

    @property
    def in_proj_section_names(self) -> Tuple[str, ...]:
        """in_proj's sections in row order: q, k, v, z, b, a less the ablated ones."""
        return tuple(n for n in IN_PROJ_SECTIONS
                     if not (n == "z" and not self.use_output_gate) and not (n == "a" and not self.use_decay))

    @property
    def in_proj_sections_local_tp(self) -> Tuple[int, ...]:
        """Output widths of in_proj's sections (in_proj_section_names) on one rank."""
        hv = self.num_value_heads_local_tp
        widths = {"q": self.qk_dim_local_tp, "k": self.qk_dim_local_tp, "v": self.v_dim_local_tp,
                  "z": self.v_dim_local_tp, "b": hv, "a": hv}
        return tuple(widths[n] for n in self.in_proj_section_names)

    @property
    def in_proj_dim(self) -> int:
        """Global output width of in_proj (all ranks)."""
        return sum(self.in_proj_sections_local_tp) * self.tp_size

    @property
    def v_dim(self) -> int:
        """Global input width of out_proj."""
        return self.num_value_heads * self.value_head_dim


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_gdn_dims(config, tp_size: int, cp_size: int = 1) -> GDNDims:
    """Reads and validates the GDN sizes of `config` (a TransformerConfig) for `tp_size` ranks."""
    num_key_heads = config.linear_num_key_heads
    if num_key_heads is None:
        num_key_heads = config.num_attention_heads
    num_key_heads = _positive_int("linear_num_key_heads", num_key_heads)

    num_value_heads = config.linear_num_value_heads
    if num_value_heads is None:
        num_value_heads = num_key_heads
    num_value_heads = _positive_int("linear_num_value_heads", num_value_heads)

    key_head_dim = config.linear_key_head_dim
    if key_head_dim is None:
        key_head_dim = config.kv_channels
    key_head_dim = _positive_int("linear_key_head_dim", key_head_dim)

    value_head_dim = config.linear_value_head_dim
    if value_head_dim is None:
        value_head_dim = key_head_dim
    value_head_dim = _positive_int("linear_value_head_dim", value_head_dim)

    conv_kernel_dim = config.linear_conv_kernel_dim
    if conv_kernel_dim is None:
        conv_kernel_dim = 4
    conv_kernel_dim = _positive_int("linear_conv_kernel_dim", conv_kernel_dim)

    if num_value_heads % num_key_heads != 0:
        raise ValueError(
            f"linear_num_value_heads ({num_value_heads}) must be a multiple of "
            f"linear_num_key_heads ({num_key_heads}) (grouped value heads share a key head)"
        )
    if key_head_dim > MAX_KEY_HEAD_DIM:
        raise ValueError(
            f"linear_key_head_dim={key_head_dim} is not supported: the chunk kernel needs "
            f"linear_key_head_dim <= {MAX_KEY_HEAD_DIM}"
        )
    if value_head_dim > MAX_VALUE_HEAD_DIM:
        raise ValueError(
            f"linear_value_head_dim={value_head_dim} is not supported: the chunk kernel needs "
            f"linear_value_head_dim <= {MAX_VALUE_HEAD_DIM}"
        )
    if not MIN_CONV_KERNEL_DIM <= conv_kernel_dim <= MAX_CONV_KERNEL_DIM:
        raise ValueError(
            f"linear_conv_kernel_dim={conv_kernel_dim} is not supported: expected "
            f"{MIN_CONV_KERNEL_DIM} <= linear_conv_kernel_dim <= {MAX_CONV_KERNEL_DIM}"
        )
    tp_size = _positive_int("tensor_model_parallel_size", tp_size)
    if num_key_heads % tp_size != 0:
        raise ValueError(
            f"linear_num_key_heads ({num_key_heads}) must be divisible by "
            f"tensor_model_parallel_size ({tp_size}): each rank owns whole key-head groups"
        )
    if num_value_heads % tp_size != 0:
        raise ValueError(
            f"linear_num_value_heads ({num_value_heads}) must be divisible by "
            f"tensor_model_parallel_size ({tp_size})"
        )
    return GDNDims(
        hidden_size=config.hidden_size,
        num_key_heads=num_key_heads,
        num_value_heads=num_value_heads,
        key_head_dim=key_head_dim,
        value_head_dim=value_head_dim,
        conv_kernel_dim=conv_kernel_dim,
        tp_size=tp_size,
    )


def param_device(config) -> torch.device:
    """Where a mixer creates its raw parameters: the CPU with use_cpu_initialization (or
    without a GPU), else the current GPU (as Megatron's own layers do)."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def thd_cu_seqlens(packed_seq_params, batch: int):
    """The global cu_seqlens of Megatron's packed (THD) input (the padded boundaries when
    Megatron gives them), or None for dense rows; packed input must have batch size 1."""
    if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", "thd") != "thd":
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None for qkv_format='thd'")
    if batch != 1:
        raise ValueError(f"packed sequences (qkv_format='thd') need batch size 1, got {batch}")
    return cu


def packed_cu_seqlens(packed_seq_params, batch: int, tokens: int):
    """The cu_seqlens of Megatron's packed (THD) input for a token mixer without context
    parallelism (thd_cu_seqlens, checked against the input's tokens), or None for dense rows."""
    cu = thd_cu_seqlens(packed_seq_params, batch)
    if cu is None:
        return None
    if int(cu[-1]) != tokens:
        raise ValueError(
            f"packed_seq_params.cu_seqlens_q[-1]={int(cu[-1])} does not match the {tokens} "
            "tokens of the input"
        )
    return cu
