"""chunk_gated_delta_rule rejects bad arguments with a ValueError / TypeError naming them.

Legend: B batch, T tokens, H key heads, HV value heads, K key dim, V value dim, N state rows.
"""
from functools import partial

import pytest
import torch
from device import DEVICE

from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule
from megatron_gdn.kernels.utils import force_backend

B, T, H, HV, K, V = 2, 10, 2, 4, 8, 8
# on a GPU machine the "triton" backend needs CUDA tensors (CPU tensors would ask for the
# interpreter), so the arguments live on the suite's device (values do not matter here)
randn = partial(torch.randn, device=DEVICE)
rand = partial(torch.rand, device=DEVICE)
zeros = partial(torch.zeros, device=DEVICE)
ones = partial(torch.ones, device=DEVICE)
tensor = partial(torch.tensor, device=DEVICE)


def valid_args():
    return dict(
        q=randn(B, T, H, K),
        k=randn(B, T, H, K),
        v=randn(B, T, HV, V),
        g=-rand(B, T, HV),
        beta=rand(B, T, HV),
    )


def packed_args(cu):
    args = {name: t[:1] for name, t in valid_args().items()}
    args["cu_seqlens"] = tensor(cu)
    return args


def with_(**changes):
    def make():
        args = valid_args()
        args.update(changes)
        return args
    return make


def with_packed(cu, **changes):
    def make():
        args = packed_args(cu)
        args.update(changes)
        return args
    return make


BAD = {
    "q-rank": (with_(q=randn(B, T, H * K)), ValueError, r"^q must have 4 dimensions"),
    "q-not-tensor": (with_(q=[[0.0]]), TypeError, r"^q must be a torch.Tensor"),
    "q-int": (with_(q=ones(B, T, H, K, dtype=torch.int32)), TypeError, r"^q must be a floating"),
    "k-shape": (with_(k=randn(B, T, H, K + 1)), ValueError, r"^k must have q's shape"),
    "v-batch": (with_(v=randn(B, T + 1, HV, V)), ValueError, r"^v must be \[B, T, HV, V\]"),
    "v-rank": (with_(v=randn(B, T, HV * V)), ValueError, r"^v must have 4 dimensions"),
    "heads-divide": (with_(v=randn(B, T, 3, V), g=-rand(B, T, 3), beta=rand(B, T, 3)),
                     ValueError, r"HV=3 .*not a multiple of H=2"),
    "g-shape": (with_(g=-rand(B, T, H)), ValueError, r"^g must be \[B, T, HV\]"),
    "g-rank": (with_(g=-rand(B, T, HV, 1)), ValueError, r"^g must have 3 dimensions"),
    "beta-shape": (with_(beta=rand(B, T + 1, HV)), ValueError, r"^beta must be \[B, T, HV\]"),
    "qkv-dtype": (with_(k=randn(B, T, H, K, dtype=torch.bfloat16)), TypeError, r"^k has dtype"),
    "v-dtype": (with_(v=randn(B, T, HV, V, dtype=torch.float16)), TypeError, r"^v has dtype"),
    "device": (with_(g=-rand(B, T, HV, device="meta")), ValueError, r"g on meta"),
    "cu-batch": (with_(cu_seqlens=tensor([0, 4, T])), ValueError, r"cu_seqlens.*B=2"),
    "cu-start": (with_packed([1, 4, T]), ValueError, r"cu_seqlens must start at 0"),
    "cu-end": (with_packed([0, 4, T - 1]), ValueError, r"cu_seqlens must end at T=10"),
    "cu-decreasing": (with_packed([0, 6, 4, T]), ValueError, r"cu_seqlens must be non-decreasing"),
    "cu-float": (with_packed([0, 4, T], cu_seqlens=tensor([0.0, 4.0, 10.0])), TypeError,
                 r"cu_seqlens must be int32 or int64"),
    "state-shape": (with_(initial_state=zeros(B, H, K, V)), ValueError, r"^initial_state must be \[N, HV, K, V\]"),
    "state-rows-packed": (with_packed([0, 4, T], initial_state=zeros(1, HV, K, V)), ValueError,
                          r"^initial_state must be \[N, HV, K, V\] = \(2, 4, 8, 8\)"),
    "state-dtype": (with_(initial_state=zeros(B, HV, K, V, dtype=torch.bfloat16)), TypeError,
                    r"^initial_state must be float32"),
    "A_log-shape": (with_(A_log=zeros(H)), ValueError, r"^A_log must be \[HV\]"),
    "dt_bias-shape": (with_(A_log=zeros(HV), dt_bias=zeros(HV, 1)), ValueError, r"^dt_bias must have 1 dim"),
    "dt_bias-without-A_log": (with_(dt_bias=zeros(HV)), ValueError, r"dt_bias is given without A_log"),
    "A_log-dtype": (with_(A_log=zeros(HV, dtype=torch.bfloat16)), TypeError, r"^A_log must be float32"),
    "scale-type": (with_(scale="0.1"), TypeError, r"^scale must be a python float"),
    "empty-T": (with_(q=randn(B, 0, H, K), k=randn(B, 0, H, K), v=randn(B, 0, HV, V),
                      g=zeros(B, 0, HV), beta=zeros(B, 0, HV)), ValueError, r"^empty inputs"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument(name, backend):
    make, exc, pattern = BAD[name]
    with force_backend(backend), pytest.raises(exc, match=pattern):
        chunk_gated_delta_rule(**make())


@pytest.mark.parametrize(
    "k_dim, v_dim, pattern",
    [(257, 8, r"K=257 exceeds the Triton kernels' limit 256"), (8, 1025, r"V=1025 exceeds the Triton kernels' limit 1024")],
)
def test_triton_head_dim_limits(k_dim, v_dim, pattern):
    args = dict(
        q=randn(1, 2, 1, k_dim), k=randn(1, 2, 1, k_dim), v=randn(1, 2, 1, v_dim),
        g=-rand(1, 2, 1), beta=rand(1, 2, 1),
    )
    with force_backend("triton"), pytest.raises(ValueError, match=pattern):
        chunk_gated_delta_rule(**args)
    # the torch path has no such limit
    with force_backend("torch"):
        o, _ = chunk_gated_delta_rule(**args)
    assert o.shape == (1, 2, 1, v_dim)


def test_float64_only_on_torch_path():
    args = {name: t.double() for name, t in valid_args().items()}
    with force_backend("triton"), pytest.raises(TypeError, match=r"^q has dtype torch.float64"):
        chunk_gated_delta_rule(**args)
    with force_backend("torch"):
        o, _ = chunk_gated_delta_rule(**args)
    assert o.dtype == torch.float64


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_valid_arguments_pass_validation(backend):
    """The base arguments of the table above are valid: each bad case differs in one thing."""
    from megatron_gdn.kernels.gated_delta_rule.api import _check_args

    args = valid_args()
    _check_args(args["q"], args["k"], args["v"], args["g"], args["beta"], None, zeros(B, HV, K, V),
                None, zeros(HV), zeros(HV), backend == "triton")
    p = packed_args([0, 4, T])
    _check_args(p["q"], p["k"], p["v"], p["g"], p["beta"], 0.3, zeros(2, HV, K, V),
                p["cu_seqlens"], None, None, backend == "triton")
