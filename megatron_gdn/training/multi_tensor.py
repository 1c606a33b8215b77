"""Multi-tensor stand-ins for Megatron's per-tensor fallbacks of Apex's `amp_C` ops.

Without Transformer Engine and Apex (our GPU machines have neither), megatron-core's optimizer
step falls back to `megatron.core.utils.local_multi_tensor_l2_norm` and
`local_multi_tensor_scale`. The first takes one `torch.norm` per parameter and then builds a
tensor from the list of 0-d CUDA results, one device-to-host copy per parameter (~230 host
synchronisations per step at GDN 1.3B, the GPU idle in between); the second runs
`dst.copy_(src * scale)` per parameter, two kernels and an fp32 temporary each (14 bytes moved
per parameter to copy the fp32 main weights into the bf16 model weights, where 6 suffice).

`install()` puts `torch._foreach_*` versions in their place, with the same signatures and the
same results (the scale and copy bit for bit; the norm as one fp32 reduction over the
per-tensor norms, as the fallback computes it), where Megatron chose the fallbacks, and
nowhere else: a run with TE or Apex keeps their kernels.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["foreach_l2_norm", "foreach_scale", "install"]


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: List[List[torch.Tensor]],
                    per_tensor: bool, *args) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Drop-in for `amp_C.multi_tensor_l2norm` (as Megatron's local fallback: no per-tensor
    norms returned): the L2 norm of all tensors of `tensor_lists[0]` together, a float32 [1]
    tensor on their device, with no host synchronisation."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack(norms).float())
    return total.reshape(1), None


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: List[List[torch.Tensor]],
                  scale: float) -> None:
    """Drop-in for `amp_C.multi_tensor_scale`: dst = src * scale for the pairs of
    `tensor_lists` = [src, dst] (dst may be src itself, or of another dtype)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install() -> List[str]:
    """Replace Megatron's per-tensor fallbacks by the functions above in the modules that chose
    them at import; returns the names replaced (empty with TE or Apex). Idempotent."""
    import importlib

    from megatron.core import utils as core_utils

    swaps = {core_utils.local_multi_tensor_l2_norm: foreach_l2_norm,
             core_utils.local_multi_tensor_scale: foreach_scale}
    targets = [("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl"),
               ("megatron.core.optimizer.clip_grads", "l2_norm_impl"),
               ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"),
               ("megatron.training.utils.common_utils", "multi_tensor_l2norm")]
    replaced = []
    for module_name, attr in targets:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        current = getattr(module, attr, None)
        if current in swaps:
            setattr(module, attr, swaps[current])
            replaced.append(f"{module_name}.{attr}")
    return replaced
