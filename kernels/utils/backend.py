"""Which implementation runs a kernel call.

CUDA tensors run the Triton kernels; CPU tensors run the pure-torch path. For testing the
Triton kernels without a GPU, set `MEGATRON_GDN_BACKEND=triton` (or use `force_backend`)
together with `TRITON_INTERPRET=1`: Triton reads that variable when a kernel is decorated, so
it must be set before `megatron_gdn.kernels` is imported (tests/conftest.py does this).
"""
import contextlib
import os
import threading

import torch

_VALID = ("auto", "torch", "triton")
_state = threading.local()


def _current() -> str:
    forced = getattr(_state, "backend", None)
    if forced is not None:
        return forced
    value = os.environ.get("MEGATRON_GDN_BACKEND", "auto")
    if value not in _VALID:
        raise ValueError(f"MEGATRON_GDN_BACKEND={value!r}: expected one of {_VALID}")
    return value


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernels should run for tensors on x's device."""
    backend = _current()
    if backend == "torch":
        return False
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                "megatron_gdn.kernels is imported"
            )
        return True
    return x.is_cuda


@contextlib.contextmanager
def force_backend(name: str):
    """Run the enclosed calls with one backend: 'torch', 'triton' or 'auto'."""
    if name not in _VALID:
        raise ValueError(f"backend={name!r}: expected one of {_VALID}")
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


KEEP_STATES_ENV = "MEGATRON_GDN_KEEP_STATES"


def keep_states_default() -> bool:
    """Whether the chunked gated delta rule keeps its per-chunk states for the backward when a
    call does not say (`keep_states=None`): `MEGATRON_GDN_KEEP_STATES`, '0' (the default: the
    backward recomputes them) or '1'. Read at every call, so a training script can set it after
    import (`--gdn-keep-chunk-states`)."""
    value = os.environ.get(KEEP_STATES_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{KEEP_STATES_ENV}={value!r}: expected '0' (recompute the chunk states "
                         "in the backward) or '1' (keep them from the forward)")
    return value == "1"


def set_keep_states_default(on: bool = True) -> None:
    """Make `keep_states_default()` return `on` in this process (what `--gdn-keep-chunk-states`
    and the benchmarks' `--keep-states` do): sets MEGATRON_GDN_KEEP_STATES."""
    os.environ[KEEP_STATES_ENV] = "1" if on else "0"
