"""Unit tests of the chunked forward's building blocks (kernels/gated_delta_rule/chunk_fwd.py)
and of the Triton forward end to end, against the naive recurrence in float64.

On a CPU machine the kernels run under the Triton interpreter in float32 (bf16 is wrong there,
see the notes on Triton on CPU), so the shapes stay small. Inputs are drawn on the CPU from
seeded generators and moved to tests/device.py's DEVICE.
"""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule
from megatron_gdn.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule_triton
from megatron_gdn.kernels.gated_delta_rule.chunk_fwd import (
    chunk_output_fwd,
    chunk_prepare_fwd,
    chunk_state_fwd,
    chunk_wy_fwd,
    make_chunk_layout,
)
from device import CUDA, DEVICE as DEV
from tolerance import FP32_REL, TF32_REL, assert_close

# interpreter: exact fp32 dots; GPU: tf32 dots for fp32 inputs
REL = TF32_REL if CUDA else 20 * FP32_REL


def _draw(*shape, seed, uniform=False, dtype=torch.float32):
    """randn (or rand with uniform=True) from a seeded CPU generator, on DEV."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand if uniform else torch.randn
    return draw(*shape, generator=gen, dtype=dtype).to(DEV)


def _inputs(B, T, H, HV, K, V, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -torch.rand(B, T, HV, generator=gen) * 0.3
    beta = torch.rand(B, T, HV, generator=gen)
    return [x.to(DEV, dtype) for x in (q, k, v, g, beta)]


def _reference_wy(k, v, g, beta, cu):
    """w, u, gc for one packed sequence list in float64 by explicit per-chunk inverses."""
    B, T, H, K = k.shape
    HV = v.shape[2]
    G = HV // H
    kk = k.double().repeat_interleave(G, dim=2)
    w = torch.zeros(B, T, HV, K, dtype=torch.float64)
    u = torch.zeros(B, T, HV, v.shape[3], dtype=torch.float64)
    gc = torch.zeros(B, T, HV, dtype=torch.float64)
    spans = [(b, 0, T) for b in range(B)] if cu is None else [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    for b, s, e in spans:
        for c0 in range(s, e, 64):
            c1 = min(c0 + 64, e)
            kc, vc = kk[b, c0:c1].cpu(), v[b, c0:c1].double().cpu()
            gcc = torch.cumsum(g[b, c0:c1].double().cpu(), 0)
            bc = beta[b, c0:c1].double().cpu()
            for hv in range(HV):
                a = torch.tril(bc[:, hv, None] * (kc[:, hv] @ kc[:, hv].T)
                               * torch.exp(gcc[:, hv, None] - gcc[None, :, hv]), -1)
                tm = torch.linalg.inv(torch.eye(c1 - c0, dtype=torch.float64) + a)
                w[b, c0:c1, hv] = tm @ (bc[:, hv, None] * torch.exp(gcc[:, hv, None]) * kc[:, hv])
                u[b, c0:c1, hv] = tm @ (bc[:, hv, None] * vc[:, hv])
            gc[b, c0:c1] = gcc
    return w, u, gc


@pytest.mark.parametrize("cu", [None, [0, 1, 65, 130, 200]], ids=["batch", "packed"])
def test_prepare_matches_explicit_inverse(cu):
    B = 2 if cu is None else 1
    T = 100 if cu is None else cu[-1]
    q, k, v, g, beta = _inputs(B, T, 2, 4, 32, 16, seed=1)
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    layout = make_chunk_layout(cu_t, B, T)
    gc, beta_out, k_rstd, w, u = chunk_prepare_fwd(k, v, g, beta, layout)
    w_ref, u_ref, gc_ref = _reference_wy(k, v, g, beta, cu)
    assert k_rstd is None
    assert_close(gc, gc_ref, FP32_REL, "gc")
    assert_close(beta_out, beta, FP32_REL, "beta")
    assert_close(w, w_ref, REL, "w")
    assert_close(u, u_ref, REL, "u")
    w2, u2 = chunk_wy_fwd(k, v, gc, beta_out, layout)
    assert torch.equal(w2, w) and torch.equal(u2, u)


def test_inverse_with_strong_coupling():
    """beta = 1 and identical keys inside a chunk: (I + A) far from I, the block products of
    the 64x64 inverse all matter."""
    B, T, H, K, V = 1, 64, 1, 16, 16
    q, k, v, g, beta = _inputs(B, T, H, H, K, V, seed=2)
    k = F.normalize(k[:, :1].expand(B, T, H, K) + 0.1 * k, dim=-1).contiguous()
    beta = torch.ones_like(beta)
    g = torch.zeros_like(g)
    layout = make_chunk_layout(None, B, T)
    _, _, _, w, u = chunk_prepare_fwd(k, v, g, beta, layout)
    w_ref, u_ref, _ = _reference_wy(k, v, g, beta, None)
    assert_close(w, w_ref, REL, "w")
    assert_close(u, u_ref, REL, "u")


def test_states_match_naive_at_chunk_boundaries():
    B, T, H, HV, K, V = 1, 150, 1, 2, 16, 32
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, seed=3)
    h0 = _draw(B, HV, K, V, seed=30)
    layout = make_chunk_layout(None, B, T)
    gc, _, _, w, u = chunk_prepare_fwd(k, v, g, beta, layout)
    h, v_new, ht = chunk_state_fwd(k, w, u, gc, layout, h0, True)
    assert h.shape == (3, HV, K, V)
    for c, t in enumerate((0, 64, 128)):
        if t == 0:
            ref = h0
        else:
            _, ref = naive_recurrent_gated_delta_rule(
                q[:, :t].double(), k[:, :t].double(), v[:, :t].double(), g[:, :t].double(),
                beta[:, :t].double(), None, h0.double(), True)
        assert_close(h[c], ref[0], REL, f"h[{c}]")
    _, ref = naive_recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                              beta.double(), None, h0.double(), True)
    assert_close(ht, ref, REL, "final_state")


def _oracle(q, k, v, g, beta, scale, h0, cu, l2, A_log, dt_bias, sig):
    qd, kd, vd, gd, bd = (x.double() for x in (q, k, v, g, beta))
    if l2:
        qd = qd * torch.rsqrt((qd * qd).sum(-1, keepdim=True) + 1e-6)
        kd = kd * torch.rsqrt((kd * kd).sum(-1, keepdim=True) + 1e-6)
    if A_log is not None:
        x = gd + (dt_bias.double() if dt_bias is not None else 0.0)
        gd = -torch.exp(A_log.double()) * F.softplus(x)
    if sig:
        bd = torch.sigmoid(bd)
    return naive_recurrent_gated_delta_rule(qd, kd, vd, gd, bd, scale,
                                            None if h0 is None else h0.double(), True, cu)


CASES = [
    # id, B, T, H, HV, K, V, cu, h0, l2, gate, sigmoid
    ("T1", 1, 1, 1, 1, 16, 16, None, False, False, False, False),
    ("T63-gva", 2, 63, 1, 2, 32, 16, None, True, False, False, False),
    ("T130-K48-V40", 1, 130, 2, 2, 48, 40, None, True, False, False, False),
    ("packed", 1, 203, 2, 4, 32, 32, [0, 1, 64, 65, 140, 140, 203], True, False, False, False),
    ("fused", 2, 90, 2, 4, 32, 32, None, True, True, True, True),
    ("fused-packed", 1, 150, 1, 2, 16, 32, [0, 7, 71, 150], False, True, True, True),
    # several key / value column blocks, V not a power of two
    ("K128-V80-gva", 1, 70, 1, 2, 128, 80, None, True, True, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_naive(case):
    _, B, T, H, HV, K, V, cu, use_h0, l2, gate, sig = case
    seed = zlib.crc32(case[0].encode()) % 1000
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, seed=seed)
    if not l2:
        q = q / math.sqrt(K)
    else:
        k = k * 3.0
    A_log = dt_bias = None
    if gate:
        g = _draw(*g.shape, seed=seed + 1)
        A_log = _draw(HV, seed=seed + 2, uniform=True) * 0.5 - 1.0
        dt_bias = _draw(HV, seed=seed + 3) * 0.5
    if sig:
        beta = _draw(*beta.shape, seed=seed + 4) * 2
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    N = B if cu is None else len(cu) - 1
    h0 = _draw(N, HV, K, V, seed=seed + 5) if use_h0 else None
    o, ht = chunk_gated_delta_rule_triton(q, k, v, g, beta, 0.7, h0, True, cu_t,
                                          use_qk_l2norm=l2, A_log=A_log, dt_bias=dt_bias,
                                          use_beta_sigmoid=sig)
    o_ref, ht_ref = _oracle(q, k, v, g, beta, 0.7, h0, cu_t, l2, A_log, dt_bias, sig)
    assert o.dtype == v.dtype and ht.dtype == torch.float32
    assert_close(o, o_ref, REL, "o")
    assert_close(ht, ht_ref, REL, "final_state")


def test_l2norm_statistics_saved():
    B, T, H, HV, K, V = 1, 70, 2, 2, 32, 16
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, seed=5)
    k = k * 2.0
    layout = make_chunk_layout(None, B, T)
    gc, _, k_rstd, w, u = chunk_prepare_fwd(k, v, g, beta, layout, use_qk_l2norm=True)
    h, v_new, _ = chunk_state_fwd(k, w, u, gc, layout, k_rstd=k_rstd)
    _, q_rstd = chunk_output_fwd(q, k, v_new, h, gc, 1.0, layout, k_rstd=k_rstd,
                                 use_qk_l2norm=True)
    assert_close(k_rstd, torch.rsqrt((k.double() ** 2).sum(-1) + 1e-6), FP32_REL, "k_rstd")
    assert_close(q_rstd, torch.rsqrt((q.double() ** 2).sum(-1) + 1e-6), FP32_REL, "q_rstd")


def test_forward_fp16_matches_fp32_path():
    """Half-precision inputs (bf16 is wrong under the interpreter; fp16 exercises the same
    casts): o within fp16 rounding of the float64 oracle on the fp16 values."""
    B, T, H, HV, K, V = 1, 100, 1, 2, 32, 32
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, seed=9)
    q, k, v = (x.half() for x in (q, k, v))
    o, ht = chunk_gated_delta_rule_triton(q, k, v, g, beta, None, None, True, None,
                                          use_qk_l2norm=True)
    o_ref, ht_ref = _oracle(q, k, v, g, beta, K ** -0.5, None, None, True, None, None, False)
    assert o.dtype == torch.float16
    # fp16 operands of the dots and fp16 w, u, v_new, h: a few fp16 ulps (2^-11) per step
    assert_close(o, o_ref, 5e-3, "o")
    assert_close(ht, ht_ref, 5e-3, "final_state")


@pytest.mark.parametrize("cu", [None, [0, 30, 30, 150]], ids=["batch", "packed"])
def test_affine_summary(cu):
    """S_out = M S_in + H for any S_in: the summary context parallelism exchanges."""
    from megatron_gdn.kernels.gated_delta_rule.chunk_fwd import chunk_affine_summary

    B = 2 if cu is None else 1
    T = 100 if cu is None else cu[-1]
    H, HV, K, V = 1, 2, 16, 32
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, seed=12)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    N = B if cu is None else len(cu) - 1
    layout = make_chunk_layout(cu_t, B, T)
    gc, _, _, w, u = chunk_prepare_fwd(k, v, g, beta, layout)
    m, h = chunk_affine_summary(k, w, u, gc, layout)
    s_in = _draw(N, HV, K, V, seed=31, dtype=torch.float64)
    _, s_out = naive_recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                                beta.double(), None, s_in, True, cu_t)
    assert_close(m.double() @ s_in + h.double(), s_out, REL, "M S_in + H")
    _, h_ref = naive_recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                                beta.double(), None, None, True, cu_t)
    assert_close(h, h_ref, REL, "H")


# ------------------------------------------------------------ the gate's elementwise launches
@pytest.mark.parametrize("dt_bias,sigmoid", [(True, True), (False, False)])
def test_gate_launches_against_autograd(dt_bias, sigmoid):
    """gate.py's activation and chain rule against torch autograd of the same formulas in
    float64: several programs' partial sums for dA_log / ddt_bias (900 rows, 6 heads: 4
    programs of 256 rows, the last partial), with and without dt_bias and the beta sigmoid."""
    from megatron_gdn.kernels.gated_delta_rule.gate import gate_activation, gate_backward

    gen = torch.Generator().manual_seed(21)
    B, T, HV = 3, 300, 6
    a = (torch.randn(B, T, HV, generator=gen) * 4).to(DEV)  # softplus arguments both sides of 0 and past 20
    a[0, 0, 0] = 30.0
    A_log = torch.randn(HV, generator=gen).to(DEV)
    bias = torch.randn(HV, generator=gen).to(DEV) if dt_bias else None
    dg = torch.randn(B, T, HV, generator=gen).to(DEV)
    dbeta = torch.randn(B, T, HV, generator=gen).to(DEV)
    beta = torch.rand(B, T, HV, generator=gen).to(DEV)

    leaves = [x.double().requires_grad_(True) for x in (a, A_log)]
    b64 = bias.double().requires_grad_(True) if dt_bias else None
    x = leaves[0] + (b64 if dt_bias else 0.0)
    g64 = -torch.exp(leaves[1]) * F.softplus(x)
    g64.backward(dg.double())
    assert_close(gate_activation(a, A_log, bias), g64.detach(), FP32_REL, "g")

    da, dA_log, ddt, dbeta_out = gate_backward(a, A_log, bias, dg, dbeta, beta if sigmoid else None,
                                               torch.float32)
    assert_close(da, leaves[0].grad, FP32_REL, "da")
    assert_close(dA_log, leaves[1].grad, FP32_REL, "dA_log")
    if dt_bias:
        assert_close(ddt, b64.grad, FP32_REL, "ddt_bias")
    else:
        assert ddt is None
    expected_db = dbeta * beta * (1 - beta) if sigmoid else dbeta
    assert_close(dbeta_out, expected_db, FP32_REL, "dbeta")
    # no fused gate: da is dg in a's dtype (fp16 here: the interpreter rounds bf16 otherwise
    # than torch), nothing summed
    da, dA_log, ddt, _ = gate_backward(a.half(), None, None, dg, dbeta, None, torch.float16)
    assert da.dtype == torch.float16 and dA_log is None and ddt is None
    assert torch.equal(da, dg.half())
