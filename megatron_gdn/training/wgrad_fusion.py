"""Megatron's gradient-accumulation fusion without Apex: the weight gradient of a linear
accumulated straight into its fp32 `main_grad` by the matmul itself.

With `--gradient-accumulation-fusion` (Megatron's default), Megatron's linears call
`fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, main_grad)`, an
Apex extension, instead of forming a bf16 weight gradient that its DDP hook then adds to the
fp32 `main_grad` (12 bytes moved per weight and micro-batch: 16 GB per 16K-token micro-batch at
GDN 1.3B, ~5 ms on an H100). Without Apex the example had to turn the fusion off. torch's
`addmm` with `out_dtype=torch.float32` (bf16 / fp16 operands, fp32 accumulation and output,
CUDA only) does the same in one cuBLAS call: main_grad += grad_output^T input, the addition in
the matmul's epilogue.

`install(device)` registers a module of that name with these functions (where no real
extension is importable and a check on the device gives the exact result), so that Megatron's
linears, and the padded in_proj of our GDN layer (`megatron_gdn.aligned_proj`), use it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from typing import Optional

import torch

__all__ = ["wgrad_gemm_accum_fp32", "wgrad_gemm_accum_fp16", "works_on", "usable_here", "install",
           "installed"]

MODULE_NAME = "fused_weight_gradient_mlp_cuda"
_CHECKED = {}


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad [out, in] (fp32) += grad_output [tokens, out]^T @ input [tokens, in]."""
    if input.dtype == torch.float32:
        main_grad.addmm_(grad_output.t(), input)
    else:
        torch.addmm(main_grad, grad_output.t(), input, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp16(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for a main_grad in the operands' half dtype."""
    main_grad.addmm_(grad_output.t(), input)


def works_on(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether wgrad_gemm_accum_fp32 runs on `device` with `dtype` operands and accumulates
    into the fp32 buffer in place, as float64 arithmetic says (checked once per device and
    dtype; on a CPU the half-operand matmul into fp32 does not exist: False)."""
    key = (str(device), dtype)
    if key not in _CHECKED:
        try:
            # on this device only (an argument check runs before Megatron sets the rank's
            # device: no context on GPU 0 for every rank)
            guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            with guard:
                _CHECKED[key] = _check(device, dtype)
        except (RuntimeError, NotImplementedError, TypeError, AssertionError):
            _CHECKED[key] = False
    return _CHECKED[key]


def _check(device: torch.device, dtype: torch.dtype) -> bool:
    """A small accumulation on `device` against float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 48, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(70, 40, generator=gen).to(device=device, dtype=dtype)
    acc = torch.randn(40, 48, generator=gen).to(device)
    expected = acc.double() + dy.double().t() @ x.double()
    wgrad_gemm_accum_fp32(x, dy, acc)  # in place
    err = ((acc.double() - expected).norm() / expected.norm()).item()
    return err < 1e-5


def usable_here() -> bool:
    """Whether this process can fuse: the real extension, or a GPU (this rank's, LOCAL_RANK)
    on which the stand-in passes its check."""
    if installed():
        return True
    if not torch.cuda.is_available():
        return False
    return works_on(_rank_device())


def _rank_device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _serving() -> Optional[str]:
    """What serves the fusion now: "torch.addmm" (the stand-in, registered), "extension"
    (Apex's, imported or importable), or None."""
    module = sys.modules.get(MODULE_NAME)
    if module is not None:
        return "torch.addmm" if getattr(module, "__megatron_gdn__", False) else "extension"
    return "extension" if importlib.util.find_spec(MODULE_NAME) is not None else None


def installed() -> bool:
    """Whether Megatron's linears can fuse the weight-gradient accumulation here (Apex's
    extension, or this module's stand-in)."""
    return _serving() is not None


def install(device: Optional[torch.device] = None) -> Optional[str]:
    """Register the stand-in as `fused_weight_gradient_mlp_cuda` (for Megatron's tensor-parallel
    linears, which looked for it at import) unless the real extension exists. Returns what
    serves the fusion: "extension" (Apex's), "torch.addmm" (the stand-in), or None where the
    check on `device` (default: this rank's GPU) fails."""
    serving = _serving()
    if serving is not None:
        return serving
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = _rank_device()
    if not works_on(device):
        return None
    module = types.ModuleType(MODULE_NAME)
    module.__doc__ = "megatron-gdn's stand-in for Apex's extension (megatron_gdn.training.wgrad_fusion)"
    module.__megatron_gdn__ = True
    module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    sys.modules[MODULE_NAME] = module
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = module
    layers._grad_accum_fusion_available = True
    return "torch.addmm"
