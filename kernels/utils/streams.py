"""Two independent groups of launches side by side on one GPU: the caller's stream and a side
stream per device. The backward passes use it for their two sequential passes over the chunks
(the states again, forward, and the state gradients, reverse), which read the same inputs and
nothing of each other's, and each of which leaves most of an SM idle at few programs.
"""
from typing import Callable, Dict, Iterable

import torch

_SIDE_STREAMS: Dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device):
    """The side stream of a CUDA device, or None where launches run in line: a CPU device, or
    a CUDA graph being captured on the current stream."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def beside(device: torch.device, overlap: bool, first: Callable[[], None],
           second: Callable[[], None], shared: Iterable[torch.Tensor]) -> None:
    """first() on the caller's stream and second() on the side stream beside it, joined before
    returning: second waits for the caller's work before first, and the caller's stream for
    second. `shared`: every tensor second reads or writes that the caller may free before the
    side stream is done with it (allocate second's outputs before the call, on the caller's
    stream, so that they come from its memory pool). Without a side stream (overlap False, or
    side_stream None): second() then first(), in line. first runs before second is enqueued,
    so a first call's autotuning of first's kernels times them alone (second's autotuning
    synchronizes the device before it times)."""
    side = side_stream(device) if overlap else None
    if side is None:
        second()
        first()
        return
    caller = torch.cuda.current_stream(device)
    ready = torch.cuda.Event()
    ready.record(caller)
    first()
    with torch.cuda.stream(side):
        side.wait_event(ready)
        second()
    for t in shared:
        t.record_stream(side)
    caller.wait_stream(side)
