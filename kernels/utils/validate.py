"""Argument checks shared by the kernels' public functions: user errors are ValueError /
TypeError naming the argument."""
from typing import Optional

import torch


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int) -> None:
    """cu_seqlens: [N+1] int32/int64, 0 = c_0 <= c_1 <= ... <= c_N = T, with B == 1."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens (packed sequences) needs batch size 1, got B={batch}")
    c = cu_seqlens.detach().cpu()
    if int(c[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(c[0])}")
    if int(c[-1]) != total:
        raise ValueError(f"cu_seqlens must end at T={total}, got {int(c[-1])}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def prepare_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, total: int):
    """Returns (cu_seqlens as a python list or None, number of state rows N)."""
    if cu_seqlens is None:
        return None, batch
    check_cu_seqlens(cu_seqlens, batch, total)
    return cu_seqlens.detach().cpu().tolist(), cu_seqlens.numel() - 1
