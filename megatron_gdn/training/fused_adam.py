"""torch's fused Adam / AdamW for Megatron's optimizer where Transformer Engine and Apex are absent.

Without TE or Apex, megatron-core builds `torch.optim.Adam` / `AdamW` with torch's default
implementation, the multi-tensor ("foreach") one: a dozen list-wide kernels per step, each a
pass over the fp32 parameters or moments (~80 GB moved per step at GDN 1.3B's 1.39B
parameters). torch's fused implementation does the update in one pass (parameter, gradient and
both moments read, three written: ~39 GB). The update is the same algorithm; the results agree
to rounding, not bit for bit (tests/e2e/test_fused_adam.py).

`install()` wraps megatron-core's optimizer factory so that each torch Adam / AdamW it builds is
switched to the fused implementation when every parameter of a group is a floating tensor on a
device the fused kernel supports (CUDA; and the CPU, where the tests run it). A run with TE or
Apex keeps their FusedAdam, untouched.
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["fuse", "install", "torch_optimizers"]

_FUSED_DEVICES = ("cuda", "cpu")


def torch_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (a ChainedOptimizer's parts, a
    MegatronOptimizer's `.optimizer`), or the optimizer itself."""
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
        return
    for part in getattr(optimizer, "chained_optimizers", None) or []:
        yield from torch_optimizers(part)
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and inner is not optimizer:
        yield from torch_optimizers(inner)


def _fusable(group) -> bool:
    params = group["params"]
    return (bool(params) and not group.get("differentiable", False)
            and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
            and len({p.device for p in params}) == 1)


def fuse(optimizer) -> int:
    """Switch every torch Adam / AdamW param group of `optimizer` (any Megatron optimizer)
    that has no state yet and whose parameters allow it to the fused implementation; returns
    how many groups were switched. Groups with state (a loaded checkpoint's step counters may
    sit on the CPU) are left as they are."""
    switched = 0
    for opt in torch_optimizers(optimizer):
        if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        for group in opt.param_groups:
            if group.get("fused") or not _fusable(group) or any(p in opt.state for p in group["params"]):
                continue
            group["fused"], group["foreach"] = True, False
            switched += 1
    return switched


def install() -> bool:
    """Wrap megatron-core's optimizer factory (where it uses torch's optimizers) so that the
    optimizers it returns are `fuse`d. Idempotent; False where TE / Apex serve the optimizer."""
    from megatron.core import optimizer as core_optimizer

    if not getattr(core_optimizer, "USING_PYTORCH_OPTIMIZER", False):
        return False
    build = core_optimizer._get_megatron_optimizer_based_on_param_groups
    if getattr(build, "__megatron_gdn__", False):
        return True

    def build_fused(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        fuse(optimizer)
        return optimizer

    build_fused.__megatron_gdn__ = True
    build_fused.__wrapped__ = build
    core_optimizer._get_megatron_optimizer_based_on_param_groups = build_fused
    return True
