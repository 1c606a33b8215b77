"""The two collectives context parallelism uses, thin and backend-neutral (NCCL, gloo).

Both operate on the first dimension: a local [d0, ...] tensor and a gathered [W * d0, ...]
tensor whose block w is rank w's (the concatenated form gloo requires).
"""
from typing import Callable, Tuple

import torch
import torch.distributed as dist

__all__ = ["all_gather_start", "reduce_scatter"]

# torch >= 2.14 renamed the tensor collectives (*_single); older torch has only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_start(local: torch.Tensor, group) -> Tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """Starts an asynchronous all-gather; returns (buffer [W * d0, ...], wait) where wait()
    blocks until the buffer is filled and returns it. Do independent work before wait()."""
    world = dist.get_world_size(group)
    local = local.contiguous()
    out = torch.empty((world * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype,
                      device=local.device)
    work = _all_gather(out, local, group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return out

    return out, wait


def reduce_scatter(full: torch.Tensor, group) -> torch.Tensor:
    """Sum [W * d0, ...] over ranks and keep this rank's block [d0, ...]."""
    world = dist.get_world_size(group)
    full = full.contiguous()
    out = torch.empty((full.shape[0] // world,) + tuple(full.shape[1:]), dtype=full.dtype,
                      device=full.device)
    _reduce_scatter(out, full, group=group)
    return out
