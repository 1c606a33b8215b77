"""Causal attention, full or sliding-window, on cuDNN's fused attention kernels.

NVIDIA's cudnn-frontend Python package (`pip install nvidia-cudnn-frontend`, module `cudnn`,
1.32 or newer; optional) registers two torch ops, `torch.ops.cudnn.sdpa_fwd` and
`torch.ops.cudnn.sdpa_bwd`, that take cuDNN's diagonal band: with `is_causal=True` and
`window_left=w` query t keeps key j iff t - w < j <= t, the window of attention.py's MaskSpec
(w keys, itself included). The band's kernel skips the key tiles outside it, so a window costs
~T w multiply-adds against T^2 / 2 for full causal attention, at the rate of the cuDNN causal
kernel that torch's SDPA itself runs on Hopper.

`cudnn_causal_attention(q, k, v, window, scale)`: q, k, v [B, H, T, D] (as many key / value
heads as query heads), CUDA, bf16 / fp16, D a multiple of 8 up to 256; window None is full
causal attention. `cudnn_swa_supported(q)` says whether this machine runs it: the package
imports and one small call, forward and backward, matches the same attention written in torch
(so an off-by-one in the band or a cuDNN that refuses it falls back to the other backends
instead of training on a wrong mask).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_gdn.hybrid.swa_varlen import varlen_causal_attention

__all__ = ["cudnn_causal_attention", "cudnn_swa_supported"]


@functools.lru_cache(maxsize=None)
def _ops_available() -> bool:
    """Whether the cudnn-frontend ops are registered (importing their module registers them)."""
    try:
        import cudnn.sdpa.fwd.torch_op  # noqa: F401
    except Exception:  # noqa: BLE001 (absent, or a build whose import fails: not available)
        return False
    return hasattr(torch.ops, "cudnn") and hasattr(torch.ops.cudnn, "sdpa_fwd")


def _window_left(window: Optional[int]) -> int:
    return -1 if window is None else int(window)


# the two kernels, as module attributes so that the CPU tests can check the autograd wiring
# below with the same attention written in torch
def _fwd_op(q, k, v, scale, window):
    """-> (o [B, H, T, D], lse [B, H, T, 1] float32, natural log)."""
    return torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal=True, window_left=_window_left(window),
                                    return_lse=True)


def _bwd_op(do, q, k, v, o, lse, scale, window):
    """-> (dq, dk, dv)."""
    return torch.ops.cudnn.sdpa_bwd(do, q, k, v, o, lse, scale, is_causal=True,
                                    window_left=_window_left(window))


class _CudnnCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale):
        o, lse = _fwd_op(q, k, v, scale, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do.contiguous(), q, k, v, o, lse, ctx.scale, ctx.window)
        return dq, dk, dv, None, None


def band_reference(q, k, v, window: Optional[int], scale: float) -> torch.Tensor:
    """The same attention in torch ([B, H, T, D]; swa_varlen.py's math kernel over the B rows,
    fp32 accumulation): the probe's oracle."""
    B, H, T, D = q.shape
    rows = [x.transpose(1, 2).reshape(B * T, H, D) for x in (q, k, v)]
    o = varlen_causal_attention(*rows, list(range(0, B * T + 1, T)), window, scale, kernel="math")
    return o.view(B, T, H, D).transpose(1, 2)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@functools.lru_cache(maxsize=None)
def _cudnn_works(device_index: int, dtype: torch.dtype) -> bool:
    """One small windowed call, forward and backward, against band_reference: the window's
    convention, the dtype and the installed cuDNN are checked once per device and dtype."""
    try:
        dev = torch.device("cuda", device_index)
        gen = torch.Generator(device=dev).manual_seed(0)
        # 200 tokens (not a tile multiple), window 48: rows near the start, inside and past it
        q, k, v = (torch.randn(1, 2, 200, 64, device=dev, dtype=dtype, generator=gen) for _ in range(3))
        do = torch.randn(1, 2, 200, 64, device=dev, dtype=dtype, generator=gen)
        with torch.enable_grad():  # the first use may come under no_grad (an evaluation)
            ins = [x.clone().requires_grad_() for x in (q, k, v)]
            out = _CudnnCausal.apply(*ins, 48, 0.125)
            grads = torch.autograd.grad(out, ins, do)
            ref_ins = [x.float().clone().requires_grad_() for x in (q, k, v)]
            ref = band_reference(*ref_ins, 48, 0.125)
            ref_grads = torch.autograd.grad(ref, ref_ins, do.float())
        torch.cuda.synchronize(dev)
        errors = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
        return all(e < 2e-2 for e in errors)
    except Exception:  # noqa: BLE001 (any failure: use another backend)
        return False


def cudnn_swa_supported(q: torch.Tensor) -> bool:
    """Whether cuDNN's band attention takes q's device, dtype and head dim on this machine."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    D = q.shape[-1]
    if D % 8 or D > 256 or torch.cuda.get_device_capability(q.device)[0] < 8:
        return False
    if not _ops_available():
        return False
    return _cudnn_works(q.device.index if q.device.index is not None else torch.cuda.current_device(),
                        q.dtype)


def cudnn_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           window: Optional[int], scale: float) -> torch.Tensor:
    """See the module docstring; returns o [B, H, T, D] in q's dtype."""
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape [B, H, T, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return _CudnnCausal.apply(q.contiguous(), k.contiguous(), v.contiguous(), window, float(scale))
