"""The mapping-table machinery shared by every checkpoint format.

A format module (qwen3_next.py, fla_gdn.py) declares, per layer type, a table of `Rule`s: which
of our tensors (keys of a TP=1 GPTModel state dict built from the YAML file) come from which of
theirs, and through which named transform. `convert` runs a table in either direction and
fails with a ConversionError (a ValueError) when

- a tensor a rule needs is missing (names the key and the rule),
- a tensor has the wrong shape (names the key, the expected and the actual shape),
- a source tensor is left over that no rule consumed (lists them: nothing is dropped silently).

Transforms are pairs of pure functions (to ours, to theirs) over lists of tensors; each pair
must be exact inverses on the bits (tests/interop check the round trip bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch

__all__ = ["ConversionError", "Rule", "Transform", "convert", "expect_shape", "check_model_keys"]


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the tensor and what is wrong."""


@dataclass(frozen=True)
class Transform:
    """to_ours(their tensors) -> our tensors; to_theirs(our tensors) -> their tensors."""

    to_ours: Callable[[List[torch.Tensor]], List[torch.Tensor]]
    to_theirs: Callable[[List[torch.Tensor]], List[torch.Tensor]]
    doc: str


@dataclass(frozen=True)
class Rule:
    """Our keys <-> their keys through `transform`; `ours_shapes` / `theirs_shapes` are the
    shapes each side must have (checked before and after every transform)."""

    ours: Tuple[str, ...]
    theirs: Tuple[str, ...]
    transform: Transform
    ours_shapes: Tuple[Tuple[int, ...], ...]
    theirs_shapes: Tuple[Tuple[int, ...], ...]

    def describe(self) -> str:
        return f"{' + '.join(self.theirs)} <-> {' + '.join(self.ours)} ({self.transform.doc})"


def expect_shape(key: str, tensor: torch.Tensor, shape: Sequence[int], rule: Rule) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(
            f"{key}: expected shape {tuple(shape)}, got {tuple(tensor.shape)} (rule {rule.describe()})")


def convert(rules: Iterable[Rule], source: Mapping[str, torch.Tensor], direction: str) -> Dict[str, torch.Tensor]:
    """Runs `rules` over `source`; direction "to_ours" (their state dict -> ours) or "to_theirs"."""
    if direction not in ("to_ours", "to_theirs"):
        raise ValueError(f"direction must be 'to_ours' or 'to_theirs', got {direction!r}")
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for rule in rules:
        if direction == "to_ours":
            src_keys, src_shapes, dst_keys, dst_shapes = rule.theirs, rule.theirs_shapes, rule.ours, rule.ours_shapes
            fn = rule.transform.to_ours
        else:
            src_keys, src_shapes, dst_keys, dst_shapes = rule.ours, rule.ours_shapes, rule.theirs, rule.theirs_shapes
            fn = rule.transform.to_theirs
        tensors = []
        for key, shape in zip(src_keys, src_shapes):
            if key not in source:
                raise ConversionError(f"{key}: missing from the source checkpoint (rule {rule.describe()})")
            expect_shape(key, source[key], shape, rule)
            tensors.append(source[key])
            used.add(key)
        results = fn(tensors)
        assert len(results) == len(dst_keys), rule.describe()
        for key, shape, tensor in zip(dst_keys, dst_shapes, results):
            expect_shape(key, tensor, shape, rule)
            if key in out:
                raise ConversionError(f"{key}: produced by two rules (last: {rule.describe()})")
            out[key] = tensor.contiguous()
    left = sorted(set(source) - used)
    if left:
        shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
        raise ConversionError(f"unmapped tensors in the source checkpoint: {shown}")
    return out


def check_model_keys(state: Mapping[str, torch.Tensor], model_state: Mapping[str, object]) -> None:
    """Our converted state dict against a built GPTModel's state_dict(): same tensors, same
    shapes (Megatron's `_extra_state` entries are ignored)."""
    want = {k: v for k, v in model_state.items() if not k.endswith("_extra_state")}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing:
        raise ConversionError(f"the model built from the YAML file has tensors the conversion did not produce: "
                              f"{', '.join(missing[:8])}")
    if extra:
        raise ConversionError(f"the conversion produced tensors the model built from the YAML file does not "
                              f"have: {', '.join(extra[:8])}")
    for key, tensor in want.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ConversionError(f"{key}: the model expects shape {tuple(tensor.shape)}, the conversion "
                                  f"produced {tuple(state[key].shape)}")
