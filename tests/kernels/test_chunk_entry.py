"""What the Triton entry point (kernels/gated_delta_rule/chunk.py) does around the kernels.

Padding: it zero-pads small head dims (K or V below MIN_COMPILED_HEAD_DIM) on
compiled launches. Under the interpreter the padding is off, so here it is forced on (to 32) and
the padded run must equal the unpadded one: output, final state and every gradient.
Output gradients: broadcast (stride-0) ones are materialised before the kernels read them.
Kept states: with keep_states the backward reads the forward's per-chunk states instead of
running the state pass again, with the same gradients."""
import pytest
import torch

from megatron_gdn.kernels.gated_delta_rule import chunk as ch
from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule
from megatron_gdn.kernels.utils import force_backend
from tolerance import TF32_REL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(K, V, cu, l2, **kw):
    gen = torch.Generator().manual_seed(5)
    B, T, H, HV = (1, 90, 1, 2) if cu else (2, 70, 1, 2)
    N = len(cu) - 1 if cu else B
    rand = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, k = rand(B, T, H, K), rand(B, T, H, K)
    if not l2:
        k = k / k.norm(dim=-1, keepdim=True)
    v = rand(B, T, HV, V)
    g = (-torch.rand(B, T, HV, generator=gen) * 0.5).to(DEVICE)
    beta = torch.rand(B, T, HV, generator=gen).to(DEVICE)
    h0 = rand(N, HV, K, V)
    do, dht = rand(B, T, HV, V), rand(N, HV, K, V)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE) if cu else None
    with force_backend("triton"):
        o, s = chunk_gated_delta_rule(*leaves[:5], None, leaves[5], True, cu_t, use_qk_l2norm=l2,
                                      **kw)
    ((o * do).sum() + (s * dht).sum()).backward()
    return [o.detach(), s.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("K,V,cu,l2", [(16, 16, None, False), (16, 32, (0, 5, 70, 90), True),
                                       (32, 16, None, True)])
def test_padded_equals_unpadded(monkeypatch, K, V, cu, l2):
    monkeypatch.setattr(ch, "padded_head_dims", lambda K, V: (K, V))
    plain = _run(K, V, cu, l2)
    monkeypatch.setattr(ch, "padded_head_dims", lambda K, V: (max(K, 32) + 16, max(V, 32) + 16))
    padded = _run(K, V, cu, l2)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    for name, a, b in zip(names, padded, plain):
        assert a.shape == b.shape, name
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-5, f"{name}: padded vs unpadded rel err {err:.2e}"


def test_compiled_minimum(monkeypatch):
    monkeypatch.setattr(ch, "INTERPRET", False)
    assert ch.padded_head_dims(16, 32) == (ch.MIN_COMPILED_HEAD_DIM, ch.MIN_COMPILED_HEAD_DIM)
    assert ch.padded_head_dims(128, 512) == (128, 512)
    monkeypatch.setattr(ch, "INTERPRET", True)
    assert ch.padded_head_dims(16, 32) == (16, 32)


def test_expanded_output_gradients():
    """o.sum() + final_state.sum() hands the backward stride-0 expanded gradients: the kernels
    must see them materialised (once read out of a one-element buffer: NaN gradients)."""
    gen = torch.Generator().manual_seed(9)
    B, T, H, HV, K, V = 1, 70, 1, 2, 32, 64
    rand = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, k, v, h0 = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, HV, V), rand(1, HV, K, V)
    k = k / k.norm(dim=-1, keepdim=True)
    g = (-torch.rand(B, T, HV, generator=gen) * 0.3).to(DEVICE)
    beta = torch.rand(B, T, HV, generator=gen).to(DEVICE)
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
        with force_backend(backend):
            o, s = chunk_gated_delta_rule(*leaves[:5], None, leaves[5], True)
        (o.sum() + s.sum()).backward()
        grads[backend] = [x.grad for x in leaves]
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads["triton"], grads["torch"]):
        assert torch.isfinite(a).all(), name
        err = ((a - b).norm() / b.norm()).item()
        assert err < 5e-3, f"{name}: {err:.2e}"


def _count_state_passes(monkeypatch):
    """Counts the backward's launches of the forward state pass (chunk_fwd's launcher as
    chunk_bwd calls it, beside the reverse pass or in line)."""
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd

    calls = []
    real = chunk_bwd._launch_state

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(chunk_bwd, "_launch_state", counting)
    return calls


@pytest.mark.parametrize("cu,l2", [(None, False), ((0, 5, 70, 90), True)])
def test_keep_states(monkeypatch, cu, l2):
    """keep_states=True: the backward runs no state pass and its gradients are those of the
    recomputing backward (both against the float64 recurrence)."""
    from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule

    monkeypatch.delenv("MEGATRON_GDN_KEEP_STATES", raising=False)
    calls = _count_state_passes(monkeypatch)
    recomputed = _run(32, 48, cu, l2)
    assert len(calls) == 1
    kept = _run(32, 48, cu, l2, keep_states=True)
    assert len(calls) == 1, "the backward ran the state pass although the forward kept the states"
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    # the interpreter's dots are exact fp32; a GPU's fp32 dots are TF32, and the recomputed
    # states come from w, u of another kernel (the backward's prep) than the forward's
    same, oracle = (1e-5, 1e-4) if DEVICE == "cpu" else (TF32_REL, TF32_REL)
    for name, a, b in zip(names, kept, recomputed):
        err = ((a - b).norm() / b.norm()).item()
        assert err < same, f"{name}: kept vs recomputed states rel err {err:.2e}"
    # the same inputs through the float64 token recurrence
    gen = torch.Generator().manual_seed(5)
    B, T, H, HV = (1, 90, 1, 2) if cu else (2, 70, 1, 2)
    N = len(cu) - 1 if cu else B
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k = rand(B, T, H, 32), rand(B, T, H, 32)
    if not l2:
        k = k / k.norm(dim=-1, keepdim=True)
    v = rand(B, T, HV, 48)
    g = -torch.rand(B, T, HV, generator=gen) * 0.5
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = rand(N, HV, 32, 48)
    do, dht = rand(B, T, HV, 48), rand(N, HV, 32, 48)
    leaves = [x.double().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    qn, kn = leaves[0], leaves[1]
    if l2:
        qn = qn * torch.rsqrt(qn.pow(2).sum(-1, keepdim=True) + 1e-6)
        kn = kn * torch.rsqrt(kn.pow(2).sum(-1, keepdim=True) + 1e-6)
    o, s = naive_recurrent_gated_delta_rule(qn, kn, *leaves[2:5], None, leaves[5], True,
                                            torch.tensor(cu) if cu else None)
    ((o * do.double()).sum() + (s * dht.double()).sum()).backward()
    expected = [o.detach(), s.detach()] + [x.grad for x in leaves]
    for name, a, b in zip(names, kept, expected):
        err = ((a.double().cpu() - b).norm() / b.norm()).item()
        assert err < oracle, f"{name}: kept states vs float64 recurrence rel err {err:.2e}"


def test_keep_states_from_environment(monkeypatch):
    """keep_states=None reads MEGATRON_GDN_KEEP_STATES at the call; a bad value is refused."""
    calls = _count_state_passes(monkeypatch)
    monkeypatch.setenv("MEGATRON_GDN_KEEP_STATES", "1")
    _run(16, 16, None, False)
    assert not calls
    monkeypatch.setenv("MEGATRON_GDN_KEEP_STATES", "0")
    _run(16, 16, None, False)
    assert len(calls) == 1
    monkeypatch.setenv("MEGATRON_GDN_KEEP_STATES", "yes")
    with pytest.raises(ValueError, match="MEGATRON_GDN_KEEP_STATES"):
        _run(16, 16, None, False)
    # the setter the training script and the benchmarks call (monkeypatch restores the variable)
    from megatron_gdn.kernels.utils import keep_states_default, set_keep_states_default

    set_keep_states_default()
    assert keep_states_default()
    set_keep_states_default(False)
    assert not keep_states_default()
