"""Sanity of the oracle itself: the token recurrence in naive.py.

Legend: B batch, T tokens, H key heads, HV value heads, K key dim, V value dim, N state rows.
"""
import math

import torch
import torch.nn.functional as F

from tolerance import assert_close

from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule

# float64 throughout: these identities hold up to float64 rounding
REL = 1e-12


def _inputs(B, T, H, HV, K, V, seed):
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q = torch.randn(B, T, H, K, generator=gen, dtype=f64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=f64), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=f64)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen, dtype=f64))
    beta = torch.rand(B, T, HV, generator=gen, dtype=f64)
    return q, k, v, g, beta


def test_beta0_g0_keeps_state():
    """beta = 0, g = 0: nothing is written or forgotten, o_t = scale S0^T q_t."""
    B, T, H, HV, K, V = 2, 9, 1, 2, 4, 3
    q, k, v, _, _ = _inputs(B, T, H, HV, K, V, seed=1)
    zeros = torch.zeros(B, T, HV, dtype=torch.float64)
    s0 = torch.randn(B, HV, K, V, dtype=torch.float64)
    o, s = naive_recurrent_gated_delta_rule(q, k, v, zeros, zeros, 0.5, s0, True)
    assert_close(s, s0, REL, "final_state")
    q_hv = q.repeat_interleave(HV // H, dim=2)
    expected = 0.5 * torch.einsum("bthk,bhkv->bthv", q_hv, s0)
    assert_close(o, expected, REL, "o")


def test_packed_equals_separate_runs():
    T, H, HV, K, V = 23, 2, 4, 5, 3
    cu = [0, 1, 10, 10, 23]
    q, k, v, g, beta = _inputs(1, T, H, HV, K, V, seed=2)
    s0 = torch.randn(len(cu) - 1, HV, K, V, dtype=torch.float64)
    o, s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, s0, True, torch.tensor(cu))
    for n in range(len(cu) - 1):
        sl = slice(cu[n], cu[n + 1])
        o_n, s_n = naive_recurrent_gated_delta_rule(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], None, s0[n:n + 1], True
        )
        if cu[n + 1] > cu[n]:
            assert_close(o[:, sl], o_n, REL, f"o[seq {n}]")
        assert_close(s[n:n + 1], s_n, REL, f"final_state[seq {n}]")


def test_gva_head_mapping():
    """Value head i reads key head i // (HV // H): same as running each value head alone."""
    B, T, H, HV, K, V = 1, 6, 2, 4, 3, 2
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, seed=3)
    o, s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, None, True)
    for hv in range(HV):
        hk = hv // (HV // H)
        o_1, s_1 = naive_recurrent_gated_delta_rule(
            q[:, :, hk:hk + 1], k[:, :, hk:hk + 1], v[:, :, hv:hv + 1], g[:, :, hv:hv + 1],
            beta[:, :, hv:hv + 1], None, None, True,
        )
        assert_close(o[:, :, hv:hv + 1], o_1, REL, f"o[head {hv}]")
        assert_close(s[:, hv:hv + 1], s_1, REL, f"final_state[head {hv}]")


def test_two_tokens_by_hand():
    """K = 2, V = 1, scale = 1, S0 = [1, 2]^T.

    token 1: g = log 0.5, beta = 1, k = (1, 0), v = 5, q = (1, 1):
        S = 0.5 (I - e1 e1^T) S0 + 5 e1 = [5, 1]^T,  o = 6
    token 2: g = 0, beta = 0.5, k = (0.6, 0.8), v = 1, q = (1, 0):
        k^T S = 3.8,  S = S + 0.5 k (1 - 3.8) = [4.16, -0.12]^T,  o = 4.16
    """
    f64 = torch.float64
    q = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=f64).view(1, 2, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=f64).view(1, 2, 1, 2)
    v = torch.tensor([5.0, 1.0], dtype=f64).view(1, 2, 1, 1)
    g = torch.tensor([math.log(0.5), 0.0], dtype=f64).view(1, 2, 1)
    beta = torch.tensor([1.0, 0.5], dtype=f64).view(1, 2, 1)
    s0 = torch.tensor([1.0, 2.0], dtype=f64).view(1, 1, 2, 1)
    o, s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, 1.0, s0, True)
    assert_close(o.flatten(), torch.tensor([6.0, 4.16], dtype=f64), REL, "o")
    assert_close(s.flatten(), torch.tensor([4.16, -0.12], dtype=f64), REL, "final_state")


def test_default_scale_and_dtypes():
    B, T, H, HV, K, V = 1, 4, 1, 1, 16, 2
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, seed=4)
    o_default, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta)
    o_explicit, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, K ** -0.5)
    assert_close(o_default, o_explicit, REL, "o")
    o32, s32 = naive_recurrent_gated_delta_rule(
        q.float(), k.float(), v.float(), g.float(), beta.float(), output_final_state=True
    )
    assert o32.dtype == torch.float32 and s32.dtype == torch.float32
