"""Gated delta rule: chunked (training, prefill), recurrent (decoding) and the naive oracle.

    chunk_gated_delta_rule            api.py: checks, then Triton (chunk.py) or torch (torch_ref.py)
    fused_recurrent_gated_delta_rule  recurrent.py: token by token, forward only
    naive_recurrent_gated_delta_rule  naive.py: the test oracle
"""
from .api import chunk_gated_delta_rule
from .naive import naive_recurrent_gated_delta_rule
from .recurrent import fused_recurrent_gated_delta_rule

__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
]
