"""Scalar-decay linear attention, Mamba2's SSD: chunked (training, prefill), decoding step and
the naive oracle.

    chunk_scalar_decay            api.py: checks, then Triton (chunk.py) or torch (torch_ref.py)
    scalar_decay_step             recurrent.py: one decoding token, forward only
    naive_recurrent_scalar_decay  naive.py: the test oracle
"""
from .api import chunk_scalar_decay
from .naive import naive_recurrent_scalar_decay
from .recurrent import scalar_decay_step

__all__ = [
    "chunk_scalar_decay",
    "naive_recurrent_scalar_decay",
    "scalar_decay_step",
]
