"""fused_recurrent_gated_delta_rule (decoding kernel) against the fp64 naive recurrence, both
backends (torch; Triton: compiled on a GPU, under the interpreter on a CPU machine), and against
the chunked kernel when it is run one token at a time. Inputs live on tests/device.py's DEVICE;
the argument checks (shared by both paths) run on CPU tensors everywhere.

Legend: B batch, T tokens, H key heads, HV value heads, K key dim, V value dim, N state rows.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from device import DEVICE, HALF_DTYPES, to_device
from tolerance import BF16_REL, FP32_REL, assert_close

from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule
from megatron_gdn.kernels.gated_delta_rule import recurrent
from megatron_gdn.kernels.gated_delta_rule.recurrent import (
    _fused_recurrent_triton,
    fused_recurrent_gated_delta_rule,
)
from megatron_gdn.kernels.utils import force_backend

BACKENDS = ["torch", "triton"]


def make_inputs(B, T, H, HV, K, V, dtype=torch.float32, seed=0, n_states=None, gate=None, device=DEVICE):
    """Random inputs in the working ranges: unit-norm keys (the layer L2-normalises them),
    log decays in [-1, 0), beta in (0, 1); the state is random, never zeros. Drawn on the CPU,
    returned on `device`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    if gate is None:
        g = -torch.rand(B, T, HV, generator=gen)
    else:
        g = torch.full((B, T, HV), float(gate))
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(B if n_states is None else n_states, HV, K, V, generator=gen)
    return tuple(x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), g, beta, h0))


def oracle(q, k, v, g, beta, scale=None, h0=None, cu_seqlens=None):
    """The naive recurrence in float64 on the same (possibly low-precision) inputs."""
    d = torch.float64
    return naive_recurrent_gated_delta_rule(
        q.to(d), k.to(d), v.to(d), g.to(d), beta.to(d), scale,
        None if h0 is None else h0.to(d), True, cu_seqlens,
    )


def run(backend, *args, **kwargs):
    with force_backend(backend):
        return fused_recurrent_gated_delta_rule(*args, **kwargs)


# B-T-H-HV-K-V: decode steps (T=1), short prefills (T=5), GVA, dims that are not powers of two
SHAPES = [
    (2, 1, 2, 2, 32, 32),
    (3, 1, 2, 4, 16, 48),
    (2, 5, 2, 2, 32, 32),
    (1, 5, 1, 3, 24, 40),
    (2, 7, 2, 4, 64, 64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-HV{}-K{}-V{}".format(*s))
def test_matches_naive(shape, with_state, backend):
    q, k, v, g, beta, h0 = make_inputs(*shape)
    h0 = h0 if with_state else None
    o, ht = run(backend, q, k, v, g, beta, 0.3, h0, True)
    ref_o, ref_ht = oracle(q, k, v, g, beta, 0.3, h0)
    assert o.dtype == v.dtype and ht.dtype == torch.float32
    assert_close(o, ref_o, FP32_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_and_no_final_state(backend):
    q, k, v, g, beta, h0 = make_inputs(2, 3, 2, 2, 32, 32, seed=1)
    o, ht = run(backend, q, k, v, g, beta, initial_state=h0)
    assert ht is None
    ref_o, _ = oracle(q, k, v, g, beta, 32 ** -0.5, h0)
    assert_close(o, ref_o, FP32_REL, "o")


@pytest.mark.parametrize("block_v", [8, 16, 64])
def test_triton_block_sizes(block_v):
    """The V-block sizes the decode benchmark sweeps, incl. one wider than V (masked)."""
    q, k, v, g, beta, h0 = make_inputs(2, 3, 2, 4, 32, 48, seed=2)
    ht = torch.empty_like(h0)
    o = _fused_recurrent_triton(
        q, k, v, g, beta, 0.25, h0, ht, None, 2, False, None, None, False, block_v=block_v, num_warps=2
    )
    ref_o, ref_ht = oracle(q, k, v, g, beta, 0.25, h0)
    assert_close(o, ref_o, FP32_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no_h0"])
def test_packed_sequences(backend, with_state):
    """B == 1 with cu_seqlens: one state per sequence, an empty sequence keeps its state."""
    cu = torch.tensor([0, 4, 4, 5, 11], dtype=torch.int32, device=DEVICE)
    q, k, v, g, beta, h0 = make_inputs(1, 11, 2, 4, 16, 24, seed=3, n_states=4)
    h0 = h0 if with_state else None
    o, ht = run(backend, q, k, v, g, beta, None, h0, True, cu)
    ref_o, ref_ht = oracle(q, k, v, g, beta, None, h0, cu)
    assert_close(o, ref_o, FP32_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")
    if with_state:
        assert torch.equal(ht[1], h0[1])
    # each sequence alone, as its own batch of one
    for n in range(4):
        s, e = int(cu[n]), int(cu[n + 1])
        if s == e:
            continue
        part = [x[:, s:e] for x in (q, k, v, g, beta)]
        o_n, ht_n = run(backend, *part, None, None if h0 is None else h0[n:n + 1], True)
        assert_close(o_n, o[:, s:e], FP32_REL, f"o[seq {n}]")
        assert_close(ht_n[0], ht[n], FP32_REL, f"final_state[seq {n}]")


def fused_reference_inputs(q, k, g, beta, use_qk_l2norm, A_log, dt_bias, use_beta_sigmoid):
    """The fused options written out in float64, giving plain inputs for the oracle."""
    d = torch.float64
    q, k, g, beta = q.to(d), k.to(d), g.to(d), beta.to(d)
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if A_log is not None:
        x = g + (dt_bias.to(d) if dt_bias is not None else 0.0)
        g = -torch.exp(A_log.to(d)) * F.softplus(x)
    if use_beta_sigmoid:
        beta = torch.sigmoid(beta)
    return q, k, g, beta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "l2norm,gate,sigmoid",
    [(True, None, False), (False, "A_log", False), (False, "A_log+dt_bias", True), (True, "A_log+dt_bias", True)],
    ids=["l2norm", "A_log", "A_log-dt_bias-sigmoid", "all"],
)
def test_fused_options(backend, l2norm, gate, sigmoid):
    B, T, H, HV, K, V = 2, 4, 2, 4, 16, 32
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, T, H, K, generator=gen)
    k = 3.0 * torch.randn(B, T, H, K, generator=gen)
    if not l2norm:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    # raw gate input spans the softplus branch point (x > 20 is taken as x)
    a = torch.randn(B, T, HV, generator=gen) * 4.0
    a[0, 0, 0] = 25.0
    b = torch.randn(B, T, HV, generator=gen) * 2.0 if sigmoid else torch.rand(B, T, HV, generator=gen)
    g_in = a if gate else -torch.rand(B, T, HV, generator=gen)
    A_log = torch.log(torch.empty(HV).uniform_(1, 16, generator=gen)) - 3.0 if gate else None
    dt_bias = torch.randn(HV, generator=gen) if gate == "A_log+dt_bias" else None
    h0 = torch.randn(B, HV, K, V, generator=gen)
    q, k, v, g_in, b, A_log, dt_bias, h0 = to_device(q, k, v, g_in, b, A_log, dt_bias, h0)
    o, ht = run(backend, q, k, v, g_in, b, None, h0, True,
                use_qk_l2norm=l2norm, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=sigmoid)
    rq, rk, rg, rb = fused_reference_inputs(q, k, g_in, b, l2norm, A_log, dt_bias, sigmoid)
    ref_o, ref_ht = oracle(rq, rk, v, rg, rb, None, h0)
    assert_close(o, ref_o, FP32_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_state(backend):
    q, k, v, g, beta, h0 = make_inputs(2, 3, 2, 4, 16, 32, seed=5)
    expected_o, expected_ht = run(backend, q, k, v, g, beta, None, h0.clone(), True)
    state = h0.clone()
    o, ht = run(backend, q, k, v, g, beta, None, state, inplace_state=True)
    assert ht is state
    assert torch.equal(o, expected_o)
    assert torch.equal(state, expected_ht)
    assert not torch.equal(state, h0)


def chunk_reference():
    """The chunked kernel's public function when the package has it, else the oracle with the
    fused options written out."""
    try:
        from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        def naive(q, k, v, g, beta, scale, h0, use_qk_l2norm=False, A_log=None, dt_bias=None,
                  use_beta_sigmoid=False):
            rq, rk, rg, rb = fused_reference_inputs(q, k, g, beta, use_qk_l2norm, A_log, dt_bias,
                                                    use_beta_sigmoid)
            return oracle(rq, rk, v, rg, rb, scale, h0)
        return "naive", naive

    def chunk(q, k, v, g, beta, scale, h0, **options):
        with force_backend("torch"):
            return chunk_gated_delta_rule(q, k, v, g, beta, scale, h0, True, **options)
    return "chunk", chunk


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_by_token_matches_full_sequence(backend):
    """Decoding T tokens one call at a time (state updated in place) equals one chunked call
    over the whole sequence (the chunk torch path when present, else the naive oracle)."""
    B, T, H, HV, K, V = 2, 9, 2, 4, 16, 32
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, seed=6)
    name, ref_fn = chunk_reference()
    print(f"reference: {name}")
    ref_o, ref_ht = ref_fn(q, k, v, g, beta, None, h0.clone())
    state = h0.clone()
    outs = []
    for t in range(T):
        sl = slice(t, t + 1)
        o_t, _ = run(backend, q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], None, state,
                     inplace_state=True)
        outs.append(o_t)
    assert_close(torch.cat(outs, dim=1), ref_o, FP32_REL, f"o vs {name}")
    assert_close(state, ref_ht, FP32_REL, f"final_state vs {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_options_match_full_sequence(backend):
    """All fused options at once, decoded token by token, against the full-sequence reference
    given the same raw inputs (same l2norm epsilon, softplus and sigmoid conventions)."""
    B, T, H, HV, K, V = 1, 6, 2, 4, 16, 16
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(B, T, H, K, generator=gen), 2.0 * torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    a, b = 3.0 * torch.randn(B, T, HV, generator=gen), torch.randn(B, T, HV, generator=gen)
    A_log, dt_bias = torch.randn(HV, generator=gen) - 1.0, torch.randn(HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    q, k, v, a, b, A_log, dt_bias, h0 = to_device(q, k, v, a, b, A_log, dt_bias, h0)
    options = dict(use_qk_l2norm=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True)
    name, ref_fn = chunk_reference()
    ref_o, ref_ht = ref_fn(q, k, v, a, b, None, h0.clone(), **options)
    state = h0.clone()
    outs = []
    for t in range(T):
        sl = slice(t, t + 1)
        o_t, _ = run(backend, q[:, sl], k[:, sl], v[:, sl], a[:, sl], b[:, sl], None, state,
                     inplace_state=True, **options)
        outs.append(o_t)
    assert_close(torch.cat(outs, dim=1), ref_o, FP32_REL, f"o vs {name}")
    assert_close(state, ref_ht, FP32_REL, f"final_state vs {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [0.0, -30.0], ids=["g0", "g-30"])
def test_gate_extremes(backend, gate):
    """g = 0 (no decay: the state only moves by the delta rule) and a decay so strong that the
    incoming state is forgotten (exp(-30) ~ 1e-13)."""
    q, k, v, g, beta, h0 = make_inputs(2, 5, 2, 2, 32, 32, seed=7, gate=gate)
    h0 = h0 * 100.0
    o, ht = run(backend, q, k, v, g, beta, None, h0, True)
    ref_o, ref_ht = oracle(q, k, v, g, beta, None, h0)
    assert_close(o, ref_o, FP32_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")
    if gate < 0:
        _, ht_zero = run(backend, q, k, v, g, beta, None, None, True)
        assert_close(ht, ht_zero, FP32_REL, "forgotten state")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_half_precision_inputs(backend, dtype):
    """fp16 q/k/v, and bf16 on a GPU (the Triton interpreter mishandles bf16): the output is
    rounded to the input dtype, the state stays fp32."""
    q, k, v, g, beta, h0 = make_inputs(2, 3, 2, 2, 32, 32, dtype=dtype, seed=8)
    o, ht = run(backend, q, k, v, g, beta, None, h0, True)
    ref_o, ref_ht = oracle(q, k, v, g, beta, None, h0)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_close(o, ref_o, BF16_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """q, k, v as views of one fused projection output and a transposed-storage state, as a
    layer hands them over."""
    B, T, H, HV, K, V = 2, 3, 2, 4, 16, 16
    gen = torch.Generator().manual_seed(12)
    qkv = torch.randn(B, T, 2 * H * K + HV * V, generator=gen).to(DEVICE)
    q = qkv[..., : H * K].view(B, T, H, K)
    k = F.normalize(qkv[..., H * K: 2 * H * K].view(B, T, H, K), dim=-1)
    v = qkv[..., 2 * H * K:].view(B, T, HV, V)
    g, beta = to_device(-torch.rand(B, T, HV, generator=gen), torch.rand(B, T, HV, generator=gen))
    h0 = torch.randn(B, HV, V, K, generator=gen).to(DEVICE).transpose(2, 3)
    assert not (q.is_contiguous() or v.is_contiguous() or h0.is_contiguous())
    o, ht = run(backend, q, k, v, g, beta, None, h0, True)
    ref_o, ref_ht = oracle(q, k, v, g, beta, None, h0)
    assert_close(o, ref_o, FP32_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")


def test_packed_under_graph_capture(monkeypatch):
    """Inside a CUDA graph capture the Triton path must not read cu_seqlens on the host; it
    still checks what needs no host copy. (Capture simulated, on any machine.)"""
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    q, k, v, g, beta, h0 = make_inputs(1, 5, 2, 2, 16, 16, seed=13, n_states=2)
    monkeypatch.setattr(recurrent, "_capturing", lambda x: True)

    def no_host_copy(*args, **kwargs):
        raise AssertionError("cu_seqlens read on the host during capture")
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_copy)
    o, ht = run("triton", q, k, v, g, beta, None, h0, True, cu)
    monkeypatch.undo()
    ref_o, ref_ht = oracle(q, k, v, g, beta, None, h0, cu)
    assert_close(o, ref_o, FP32_REL, "o")
    assert_close(ht, ref_ht, FP32_REL, "final_state")
    monkeypatch.setattr(recurrent, "_capturing", lambda x: True)
    with pytest.raises(ValueError, match="batch size 1"):
        run("triton", *(x.expand(2, *x.shape[1:]) for x in (q, k, v, g, beta)), None, None, False, cu)


def bad_inputs():
    # CPU tensors (the torch path) on every machine: the argument checks are shared by both paths
    q, k, v, g, beta, h0 = make_inputs(2, 1, 2, 4, 16, 16, seed=9, device="cpu")
    cases = {
        "k-shape": (dict(k=k[:, :, :1]), ValueError, "k must have"),
        "v-batch": (dict(v=v[:1]), ValueError, "v must be"),
        "gva": (dict(v=v[:, :, :3], g=g[..., :3], beta=beta[..., :3]), ValueError, "multiple of key heads"),
        "g-shape": (dict(g=g[..., :2]), ValueError, "g must be"),
        "beta-int": (dict(beta=beta.to(torch.int32)), TypeError, "beta must be a float"),
        "qkv-dtype": (dict(v=v.double()), TypeError, "share one dtype"),
        "q-float64": (dict(q=q.double(), k=k.double(), v=v.double()), TypeError, "q must be"),
        "state-shape": (dict(initial_state=h0[:1]), ValueError, "initial_state must be"),
        "state-dtype": (dict(initial_state=h0.half()), TypeError, "initial_state must be float32"),
        "inplace-no-state": (dict(inplace_state=True), ValueError, "inplace_state"),
        "inplace-noncontig": (dict(initial_state=h0.transpose(2, 3).contiguous().transpose(2, 3),
                                   inplace_state=True), ValueError, "contiguous"),
        "dt-without-A": (dict(dt_bias=torch.zeros(4)), ValueError, "dt_bias"),
        "A_log-shape": (dict(A_log=torch.zeros(2)), ValueError, "A_log must be"),
        "cu-batch": (dict(cu_seqlens=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "batch size 1"),
        "scale-type": (dict(scale=torch.tensor(1.0)), TypeError, "scale"),
    }
    base = dict(q=q, k=k, v=v, g=g, beta=beta)
    return base, cases


_BASE, _CASES = bad_inputs()


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_inputs(case):
    change, error, match = _CASES[case]
    kwargs = {**_BASE, **change}
    with pytest.raises(error, match=match):
        fused_recurrent_gated_delta_rule(**kwargs)


def test_triton_large_k_is_refused():
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 1, 512, 8, seed=10)
    with pytest.raises(ValueError, match="K <= 256"):
        run("triton", q, k, v, g, beta)
    o, _ = run("torch", q, k, v, g, beta)
    assert math.isfinite(o.abs().sum().item())
