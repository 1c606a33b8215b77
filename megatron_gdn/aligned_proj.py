"""Column-parallel projections whose output rows are padded to a 16-byte multiple in memory.

A fused input projection such as GDN's in_proj ([q | k | v | z | b | a]) has an output width
that is often not a multiple of 8: the GDN 1.3B layer's is 2 x 1536 + 2 x 3072 + 6 + 6 = 9228.
Its [tokens, 9228] output then has a row stride cuBLAS cannot use with Hopper's kernels (they
need 16-byte aligned leading dimensions), so the forward, data-gradient and weight-gradient
matmuls of that projection fall back to Ampere-generation kernels (`cutlass_80_..._align2` in
the profile of benchmarks/RESULTS.md: 143 ms of a 452 ms GDN 1.3B step on an H100, ~270
TFLOP/s where the model's aligned matmuls run at ~750).

`padded_column_linear(linear, x, pad)` computes the same projection with `pad` zero rows
appended to the weight on the fly: the output is [..., width + pad] with an aligned row stride,
and the caller splits its sections off as views (the pad columns are never read, so their
gradient is zero and split's backward writes the whole padded gradient in one buffer). The
parameter itself is unchanged (no checkpoint, conversion or optimizer difference), and the
padded weight is not kept for the backward (it is formed again there: a ~40 MB copy at the
1.3B dims, against ~0.8 GB of saved activations over 21 layers if it were kept).

Used by GatedDeltaNet's and Mamba2Mixer's in_proj. Applies to Megatron's local
`ColumnParallelLinear` (TP, SP and their communication through
Megatron's own region functions, as the linear does them); other linear classes (Transformer
Engine's), the deferred weight-gradient mode and widths already aligned use the module as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

__all__ = ["ALIGN", "aligned_pad", "padded_column_linear", "can_pad", "project_sections"]

# output widths are padded to a multiple of this many elements: 16 bytes in bf16 / fp16
ALIGN = 8


def aligned_pad(width: int, align: int = ALIGN) -> int:
    """Zero rows that make `width` a multiple of `align`."""
    return (-width) % align


class _PaddedRowsLinear(torch.autograd.Function):
    """y = x [W; 0]^T (+ [b; 0]): W [n, h], `pad` zero rows -> y [..., n + pad].

    fuse_wgrad (the linear's gradient_accumulation_fusion): the weight gradient is accumulated
    into `weight.main_grad` by the matmul (Megatron's fused_weight_gradient_mlp_cuda, Apex's or
    megatron_gdn.training.wgrad_fusion's), as Megatron's own linears do, where main_grad exists
    (Megatron's DDP); otherwise it is returned."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad, fuse_wgrad=False):
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.has_bias, ctx.fuse_wgrad = pad, bias is not None, fuse_wgrad
        return F.linear(x, F.pad(weight, (0, 0, 0, pad)),
                        None if bias is None else F.pad(bias, (0, pad)))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, h = weight.shape
        dy2 = dy.reshape(-1, n + ctx.pad)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(dy, F.pad(weight, (0, 0, 0, ctx.pad)))
        if ctx.needs_input_grad[1]:
            # over all n + pad rows, then the first n: an output of n rows (n not a multiple of
            # 8) put the weight gradient's matmul on an Ampere kernel on an H100
            # (benchmarks/RESULTS.md, "in_proj's weight gradient")
            if ctx.fuse_wgrad and hasattr(weight, "main_grad"):
                dw = _accumulate_wgrad(weight, x.reshape(-1, h), dy2, n)
            else:
                dw = torch.matmul(dy2.t(), x.reshape(-1, h))[:n]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2[:, :n].sum(0)
        return dx, dw, db, None, None


def _accumulate_wgrad(weight, x2d, dy_padded, n):
    """main_grad += dy[:, :n]^T x in the matmul, and the gradient autograd gets instead, as
    Megatron's LinearWithGradAccumulationAndAsyncCommunication does it: a placeholder its DDP
    hook skips (grad_added_to_main_grad), zeros where the weight asks (zero_out_wgrad), else None.
    On a GPU with half operands and an fp32 main_grad, the padded rows' product in fp32, its
    first n rows added (main_grad's n rows cannot be the matmul's aligned output); otherwise
    Megatron's fused function (Apex's, or megatron_gdn.training.wgrad_fusion's stand-in)."""
    from megatron.core.tensor_parallel import layers

    main_grad = weight.main_grad
    fused = layers.fused_weight_gradient_mlp_cuda
    if (dy_padded.shape[1] != n and main_grad.dtype == torch.float32 and x2d.is_cuda
            and x2d.dtype in (torch.bfloat16, torch.float16)):
        main_grad.add_(torch.mm(dy_padded.t(), x2d, out_dtype=torch.float32)[:n])
    elif main_grad.dtype == torch.float32:
        fused.wgrad_gemm_accum_fp32(x2d, dy_padded[:, :n], main_grad)
    else:
        fused.wgrad_gemm_accum_fp16(x2d, dy_padded[:, :n], main_grad)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.main_grad.shape, dtype=x2d.dtype, device=x2d.device)


def can_pad(linear: torch.nn.Module, config) -> bool:
    """Whether `linear` is one this module can run padded: Megatron's local
    ColumnParallelLinear without gathered output, deferred weight gradients or disabled
    gradient reduction."""
    return (type(linear) is ColumnParallelLinear and not getattr(linear, "gather_output", False)
            and not getattr(config, "delay_wgrad_compute", False)
            and not getattr(linear, "disable_grad_reduce", False)
            and not getattr(linear, "explicit_expert_comm", False))


def padded_column_linear(linear: ColumnParallelLinear, x: torch.Tensor, pad: int) -> torch.Tensor:
    """linear(x)[0] with its output rows `pad` columns wider (zeros there; see the module
    docstring). x: [s(/tp with SP), b, h] as the linear takes it."""
    if linear.sequence_parallel:
        # all-gather over TP forward, reduce-scatter of the input gradient backward
        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=linear.tp_group)
    else:
        # identity forward, all-reduce of the input gradient over TP backward (none at TP = 1)
        x = copy_to_tensor_model_parallel_region(x, group=linear.tp_group)
    bias = linear.bias if not linear.skip_bias_add else None
    return _PaddedRowsLinear.apply(x, linear.weight, bias, pad,
                                   bool(getattr(linear, "gradient_accumulation_fusion", False)))


def project_sections(linear: torch.nn.Module, config, x: torch.Tensor, widths):
    """(output, widths) of a fused projection whose output is split into sections of `widths`:
    through padded_column_linear, with the pad appended to the widths as a last section to
    split off and drop, where the total is not a multiple of ALIGN and the linear allows it;
    else the linear as it is."""
    widths = list(widths)
    pad = aligned_pad(sum(widths))
    if pad and can_pad(linear, config):
        return padded_column_linear(linear, x, pad), widths + [pad]
    return linear(x)[0], widths
