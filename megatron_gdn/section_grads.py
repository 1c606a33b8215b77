"""A fused projection's output split into sections whose gradient is assembled in one buffer.

GDN's in_proj output [s, b, q | k | v | z | b | a (| pad)] is split into views, one per
section, each consumed by a different kernel (the three short convolutions, the gated norm, the
chunk kernel's gates). With `torch.split` autograd assembles the projection's gradient by
concatenating the sections' gradients: one more read and write of the whole [tokens, width]
gradient per layer (the GDN 1.3B profile of benchmarks/RESULTS.md: 21 `CatArrayBatchedCopy`
calls, 9.7 ms of a step on an H100).

`split_sections(x, widths)` returns the same views and a `SectionGrads`, whose `into(i, ...)`
gives the consumers' backward kernels (`causal_conv1d(dx_into=...)`,
`gated_rmsnorm(dz_into=...)`) the slice of one gradient buffer to write their input gradient
into. The buffer is allocated at the first such call in the backward, never in the forward (it
would live from the forward to the backward). The split's backward then returns the buffer; a
section gradient that arrives elsewhere (a consumer on the torch path, a small gate section
through a copy, a section used twice) is copied into its slice, a missing one is zeroed, so the
result is always the gradient `torch.split` gives, with or without the hints taken.

Used by GatedDeltaNet (q, k, v through the convs, z through the gated norm) and Mamba2Mixer
(xBC through its conv; z and dt are copied). Under context parallelism the convs take no hint.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

__all__ = ["SectionGrads", "split_sections"]


class SectionGrads:
    """The gradient buffer of a tensor split into sections along its last dim."""

    def __init__(self, like: torch.Tensor, widths: Sequence[int]):
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.widths = list(widths)
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self._buffer = None
        # how many section gradients arrived in place / were copied in the last backward
        self.in_place = self.copied = 0

    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._buffer

    def section(self, i: int) -> torch.Tensor:
        return self.buffer().narrow(-1, self.offsets[i], self.widths[i])

    def into(self, i: int, view: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
             ) -> Callable[[], torch.Tensor]:
        """A `*_into` hint for section i's consumer: `view` maps the section's slice to the
        tensor the consumer's input is (e.g. a transpose to [b, s, d])."""
        return lambda: view(self.section(i))

    def take(self) -> torch.Tensor:
        buf = self.buffer()
        self._buffer = None  # autograd owns it from here
        return buf


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.data_ptr() != b.data_ptr():
        return False
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


class _SplitSections(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, grads: SectionGrads):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return tuple(torch.split(x, grads.widths, dim=-1))

    @staticmethod
    def backward(ctx, *section_grads):
        grads: SectionGrads = ctx.grads
        in_place = copied = 0
        buf = grads.take()
        for i, g in enumerate(section_grads):
            dest = buf.narrow(-1, grads.offsets[i], grads.widths[i])
            if g is None:
                dest.zero_()
            elif _same_memory(g, dest):
                in_place += 1
            else:
                dest.copy_(g)
                copied += 1
        grads.in_place, grads.copied = in_place, copied
        return buf, None


def split_sections(x: torch.Tensor, widths: Sequence[int]) -> Tuple[List[torch.Tensor], SectionGrads]:
    """Views of `x` split along its last dim into `widths`, and the SectionGrads whose `into`
    hints let the consumers write the gradient in place (see the module docstring). Without
    autograd (no grad needed) the views are torch.split's."""
    widths = list(widths)
    if sum(widths) != x.shape[-1]:
        raise ValueError(f"sections {widths} sum to {sum(widths)}, not x's last dim {x.shape[-1]}")
    grads = SectionGrads(x, widths)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return list(torch.split(x, widths, dim=-1)), grads
    return list(_SplitSections.apply(x, grads)), grads
