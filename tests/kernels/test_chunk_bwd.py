"""Triton backward of the chunked gated delta rule against autograd through the float64 token
recurrence (naive.py): every gradient, packed sequences, GVA, states, extreme gates, l2-norm.

On a CPU machine the kernels run under the Triton interpreter in float32 (exact fp32 dots), so
shapes stay tiny; on a GPU the same cases run with tf32 dots and bf16 inputs.
"""
import dataclasses
import os
import subprocess
import sys
from typing import Optional, Tuple

import pytest
import torch

from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule
from tolerance import BF16_REL, TF32_REL, assert_close

chunk_fwd = pytest.importorskip("megatron_gdn.kernels.gated_delta_rule.chunk_fwd")
from megatron_gdn.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule_triton  # noqa: E402
from megatron_gdn.kernels.gated_delta_rule.chunk_bwd import chunk_gated_delta_rule_bwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter: exact fp32 arithmetic, but dg sums ~C terms of both signs per token and the
# 64x64 inverse adds a few ulps per product; measured errors are ~1e-6
INTERP_FP32_REL = 5e-5


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    cu: Optional[Tuple[int, ...]] = None
    h0: bool = True
    dht: bool = True
    l2: bool = False
    gate: str = "random"  # random | zero | strong | mixed
    beta: str = "random"  # random | binary

    @property
    def id(self) -> str:
        cu = "varlen" if self.cu else "dense"
        return (f"B{self.B}-T{self.T}-H{self.H}-HV{self.HV}-K{self.K}-V{self.V}-{cu}"
                f"-h0{int(self.h0)}-dht{int(self.dht)}-l2{int(self.l2)}-{self.gate}-{self.beta}")


CASES = [
    Case(2, 100, 2, 2, 16, 32),
    Case(1, 136, 1, 2, 32, 16, cu=(0, 1, 65, 70, 135, 136)),
    Case(1, 63, 1, 3, 16, 16, h0=False, l2=True),
    Case(1, 130, 2, 4, 16, 16, cu=(0, 64, 65, 130), dht=False, gate="mixed", beta="binary"),
    Case(1, 70, 1, 1, 16, 32, gate="zero", l2=True),
    Case(1, 40, 1, 1, 32, 16, gate="strong", beta="binary"),
    # K above 64: the k k^T / q k^T Gram matrices accumulate over column blocks
    Case(1, 70, 1, 2, 128, 16, cu=(0, 3, 70), l2=True),
]


def make_inputs(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    B, T, H, HV, K, V = case.B, case.T, case.H, case.HV, case.K, case.V
    N = len(case.cu) - 1 if case.cu else B
    q = rand(B, T, H, K)
    k = rand(B, T, H, K)
    if not case.l2:
        # keep beta k^T k of order one without the norm, as the l2-normalised layer does
        k = k / k.norm(dim=-1, keepdim=True)
    v = rand(B, T, HV, V)
    g = -torch.rand(B, T, HV, generator=gen, dtype=torch.float64) * 0.5
    if case.gate == "zero":
        g = torch.zeros_like(g)
    elif case.gate == "strong":
        g = -20.0 - 10.0 * torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    elif case.gate == "mixed":
        pick = torch.randint(0, 3, (B, T, HV), generator=gen)
        g = torch.where(pick == 0, torch.zeros_like(g), torch.where(pick == 1, g, g - 25.0))
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    if case.beta == "binary":
        beta = torch.randint(0, 2, (B, T, HV), generator=gen).to(torch.float64)
    h0 = rand(N, HV, K, V) if case.h0 else None
    do = rand(B, T, HV, V)
    dht = rand(N, HV, K, V) if case.dht else None
    return dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0, do=do, dht=dht, N=N)


def reference_grads(x, case: Case):
    """Autograd of <o, do> + <final_state, dht> through the float64 recurrence."""
    leaves = {n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "g", "beta")}
    if x["h0"] is not None:
        leaves["h0"] = x["h0"].clone().requires_grad_(True)
    q, k = leaves["q"], leaves["k"]
    if case.l2:
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    cu = torch.tensor(case.cu) if case.cu else None
    o, s = naive_recurrent_gated_delta_rule(q, k, leaves["v"], leaves["g"], leaves["beta"], None,
                                            leaves.get("h0"), True, cu)
    loss = (o * x["do"]).sum()
    if x["dht"] is not None:
        loss = loss + (s * x["dht"]).sum()
    loss.backward()
    return {n: t.grad for n, t in leaves.items()}


def chunk_cumsum(g: torch.Tensor, layout) -> torch.Tensor:
    """Inclusive cumsum of g inside each 64-token chunk of each sequence, float32."""
    B, T, HV = g.shape
    flat = g.reshape(B * T, HV).to(torch.float64)
    if layout.is_varlen:
        bounds = layout.cu_seqlens.tolist()
    else:
        bounds = [b * T for b in range(B + 1)]
    out = torch.zeros_like(flat)
    for s, e in zip(bounds[:-1], bounds[1:]):
        for c in range(s, e, 64):
            out[c:min(c + 64, e)] = flat[c:min(c + 64, e)].cumsum(0)
    return out.reshape(B, T, HV).float()


def run_backward(x, case: Case, dtype: torch.dtype, pass_g: bool = True,
                 scale: Optional[float] = None, split_group: bool = True):
    B, T = case.B, case.T
    cu = torch.tensor(case.cu, dtype=torch.int32, device=DEVICE) if case.cu else None
    layout = chunk_fwd.make_chunk_layout(cu, B, T)
    dev = lambda t, dt=dtype: None if t is None else t.to(device=DEVICE, dtype=dt).contiguous()  # noqa: E731
    q, k, v, do = dev(x["q"]), dev(x["k"]), dev(x["v"]), dev(x["do"])
    gc = chunk_cumsum(x["g"], layout).to(DEVICE)
    beta = dev(x["beta"], torch.float32)
    q_rstd = k_rstd = None
    if case.l2:
        q_rstd = torch.rsqrt(x["q"].pow(2).sum(-1) + 1e-6).float().to(DEVICE)
        k_rstd = torch.rsqrt(x["k"].pow(2).sum(-1) + 1e-6).float().to(DEVICE)
    dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_bwd(
        q, k, v, gc, beta, case.K ** -0.5 if scale is None else scale, dev(x["h0"], torch.float32), do,
        dev(x["dht"], torch.float32), layout, q_rstd=q_rstd, k_rstd=k_rstd,
        g=dev(x["g"], torch.float32) if pass_g else None, split_group=split_group,
    )
    out = dict(q=dq, k=dk, v=dv, g=dg, beta=dbeta)
    if x["h0"] is not None:
        out["h0"] = dh0
    else:
        assert dh0 is None
    return out


def check_backward(case: Case, **variant):
    """run_backward in fp32 on fresh inputs against the fp64 recurrence: every gradient."""
    x = make_inputs(case)
    expected = reference_grads(x, case)
    actual = run_backward(x, case, torch.float32, **variant)
    assert set(actual) == set(expected)
    rel = INTERP_FP32_REL if DEVICE == "cpu" else TF32_REL
    for name in expected:
        assert_close(actual[name], expected[name], rel, f"d{name}")


def pin(monkeypatch, kernel, config):
    """config as kernel's only one (no pick cached from earlier tests) for the test."""
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunk_bwd_vs_recurrence(case):
    check_backward(case)


# variants of the backward against the same reference:
# - pass_g=False: without the exact g the kernels recover it from differences of gc (same
#   results up to the rounding of gc, which these moderate gates keep small);
# - split_group=False: the gradient kernels loop over the GVA group inside one program per key
#   head (the default runs one program per value head and sums dq / dk afterwards)
@pytest.mark.parametrize("case, variant", [
    (CASES[1], dict(pass_g=False)), (CASES[3], dict(pass_g=False)),
    (CASES[2], dict(split_group=False)), (CASES[3], dict(split_group=False)),
], ids=lambda x: x.id if isinstance(x, Case) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_chunk_bwd_variants(case, variant):
    check_backward(case, **variant)


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[6]], ids=lambda c: c.id)
def test_chunk_bwd_prep_per_value_head(case, monkeypatch):
    """The prep launch one program per (chunk, value head) (PER_HV = 1, an autotune candidate
    with GVA) against the reference, and its Tm, w, u, dv_local equal to the per-key-head
    launch's, with Tm formed and with it read back."""
    import triton

    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    x = make_inputs(case)
    per_key = run_backward(x, case, torch.float32)

    def use(per_hv):
        pin(monkeypatch, cb._bwd_prep_kernel,
            triton.Config({"PER_HV": per_hv}, num_warps=4, num_stages=1))

    use(1)
    expected = reference_grads(x, case)
    actual = run_backward(x, case, torch.float32)
    rel = INTERP_FP32_REL if DEVICE == "cpu" else TF32_REL
    for name in expected:
        assert_close(actual[name], expected[name], rel, f"d{name}")
        torch.testing.assert_close(actual[name], per_key[name], rtol=1e-5, atol=1e-6)

    # the launch alone, both ways: Tm formed (HAS_TM False), then read back (True)
    B, T, H, HV, K, V = case.B, case.T, case.H, case.HV, case.K, case.V
    cu = torch.tensor(case.cu, dtype=torch.int32, device=DEVICE) if case.cu else None
    layout = chunk_fwd.make_chunk_layout(cu, B, T)
    f32 = lambda t: t.to(device=DEVICE, dtype=torch.float32).contiguous()  # noqa: E731
    q, k, v, do, g = f32(x["q"]), f32(x["k"]), f32(x["v"]), f32(x["do"]), f32(x["g"])
    gc = chunk_cumsum(x["g"], layout).to(DEVICE)
    beta = f32(x["beta"])
    outs = {}
    for per_hv in (0, 1):
        use(per_hv)
        tm = torch.full((B, T, HV, 64), float("nan"), device=DEVICE)
        bufs = [torch.full((B, T, HV, n), float("nan"), device=DEVICE) for n in (K, V, V)]
        cb.launch_prep(q, k, v, g, gc, beta, None, None, do, tm, *bufs, K ** -0.5, layout, False)
        bufs2 = [torch.full_like(b, float("nan")) for b in bufs]
        cb.launch_prep(q, k, v, g, gc, beta, None, None, do, tm, *bufs2, K ** -0.5, layout, True)
        outs[per_hv] = [tm] + bufs + bufs2
    for a, b in zip(outs[0], outs[1]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G, K", [(2, 16), (3, 48), (4, 32)])
def test_group_sum(G, K, dtype):
    """The GVA group sum of dq / dk against torch's sum over the group (fp32 accumulation, one
    rounding), rows not a multiple of the program's block, K not a power of two. bf16 within
    one unit in the last place: the interpreter's float32 -> bf16 cast need not round to
    nearest even as the GPU's does."""
    from megatron_gdn.kernels.gated_delta_rule.chunk_bwd import group_sum

    gen = torch.Generator().manual_seed(G * K)
    B, T, H = 2, 37, 3
    x, y = (torch.randn(B, T, H * G, K, generator=gen).to(DEVICE, dtype) for _ in range(2))
    sums = group_sum(x, y, G)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    for got, z in zip(sums, (x, y)):
        assert got.shape == (B, T, H, K) and got.dtype == dtype
        torch.testing.assert_close(got, z.view(B, T, H, G, K).float().sum(3).to(dtype), **tol)


@pytest.mark.parametrize("block", [16, 64, 128])
@pytest.mark.parametrize("case, variant", [
    (CASES[1], {}), (CASES[6], {}), (CASES[6], dict(split_group=False)),
], ids=lambda x: x.id if isinstance(x, Case) else "-".join(f"{k}={v}" for k, v in x.items()) or "default")
def test_chunk_bwd_key_column_blocks(case, variant, block, monkeypatch):
    """The dk launch with its key columns in blocks of 16 / 64 / 128 (its config's BK): dg,
    dbeta parts per block added up, and with several blocks the l2-norm's backward applied to
    whole rows afterwards; with one block (K <= BK) it stays in the kernel. With and without
    the group loop."""
    import triton

    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    config = triton.Config({"BV": 32, "BK": block}, num_warps=4, num_stages=1)
    pin(monkeypatch, cb._bwd_grad_k_kernel, config)
    check_backward(case, **variant)
    assert cb._bwd_grad_k_kernel.best_config is config


def test_prep_per_value_head_pruned(monkeypatch):
    """The per-value-head prep is a candidate only with GVA and where the prep forms Tm (no
    saved Tm); one config (the first) without autotuning."""
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    per_hv = lambda kept: [c.kwargs["PER_HV"] for c in kept]  # noqa: E731
    configs = cb._BWD_PREP_CONFIGS
    monkeypatch.setattr(cb, "AUTOTUNE", True)
    assert per_hv(cb._prune_bwd_prep(configs, {}, H=2, HV=4, HAS_TM=False)) == [0, 1]
    assert per_hv(cb._prune_bwd_prep(configs, {}, H=2, HV=4, HAS_TM=True)) == [0]
    assert per_hv(cb._prune_bwd_prep(configs, {}, H=4, HV=4, HAS_TM=False)) == [0]
    monkeypatch.setattr(cb, "AUTOTUNE", False)
    assert per_hv(cb._prune_bwd_prep(configs, {}, H=2, HV=4, HAS_TM=False)) == [0]


@pytest.mark.parametrize("split", [0, 1])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=lambda c: c.id)
def test_grad_vq_dq_loop(case, split, monkeypatch):
    """The vq launch with dq's do h^T accumulated in its first V loop beside Ds and dA
    (SPLIT_DQ = 0, the fixed config's way) or in a second loop (1, the interpreter's config),
    each pinned as the launch's only config (on the GPU too, where the suite runs the fixed
    config otherwise)."""
    import triton

    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    config = triton.Config({"BV": 32, "SPLIT_DQ": split}, num_warps=4, num_stages=1)
    pin(monkeypatch, cb._bwd_grad_vq_kernel, config)
    check_backward(case)
    assert cb._bwd_grad_vq_kernel.best_config is config


def test_grad_vq_configs_pruned_to_k(monkeypatch):
    """The vq launch's 4-warp configs alone at K <= 128, every config above; the first alone
    without autotuning."""
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    configs = cb._GRAD_VQ_CONFIGS

    def shape(kept):
        return [(c.num_warps, c.num_stages, c.kwargs["SPLIT_DQ"]) for c in kept]

    monkeypatch.setattr(cb, "AUTOTUNE", True)
    assert shape(cb._prune_grad_vq(configs, {}, K=128)) == [(4, 2, 0), (4, 2, 1)]
    assert shape(cb._prune_grad_vq(configs, {}, K=256)) == [(8, 1, 0), (4, 2, 0)]
    monkeypatch.setattr(cb, "AUTOTUNE", False)
    assert shape(cb._prune_grad_vq(configs * 2, {}, K=128)) == [(8, 1, 0)]


def test_grad_k_configs_pruned_to_k():
    """Each dk config's column block clamped to the next power of two of K, duplicates
    dropped, the narrower blocks only at K > 128; one config (the first) without autotuning."""
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    configs = cb._GRAD_K_CONFIGS
    blocks = lambda kept: [(c.kwargs["BK"], c.num_warps, c.num_stages, c.maxnreg) for c in kept]
    if cb.AUTOTUNE:
        assert blocks(cb._prune_grad_k(configs, {}, K=256)) == [
            (128, 8, 1, None), (64, 8, 1, 128), (128, 8, 2, None), (64, 8, 2, None)]
        assert blocks(cb._prune_grad_k(configs, {}, K=100)) == [
            (128, 8, 1, None), (128, 8, 2, None)]
        assert blocks(cb._prune_grad_k(configs, {}, K=32)) == [(32, 8, 1, None), (32, 8, 2, None)]
    else:
        assert blocks(cb._prune_grad_k(configs, {}, K=256)) == [(128, 8, 1, None)]


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("row_scale", [False, True])
@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: c.id)
def test_dh_pass_key_decay_either_side(case, row_scale, prefetch, monkeypatch):
    """The dh pass with the key decay on the product's rows or on the k operand (its config's
    ROW_SCALE: the narrow 4-warp configs scale the operand, the wide one the rows), each
    pinned as the pass's only config; with its per-step loads issued a step ahead or not
    (PREFETCH, on at K <= DH_PREFETCH_MAX_K)."""
    import triton

    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    config = triton.Config({"BV": 32, "ROW_SCALE": row_scale}, num_warps=4, num_stages=1)
    pin(monkeypatch, cb._bwd_dh_kernel, config)
    monkeypatch.setattr(cb, "DH_PREFETCH_MAX_K", 1 << 20 if prefetch else 0)
    check_backward(case)
    assert cb._bwd_dh_kernel.best_config is config


@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: c.id)
def test_dh_pass_qdo_either_source(case, prefetch, inline, monkeypatch):
    """The reverse pass forming each chunk's (scale q e^gc)^T do from q and do itself, the qdo
    launch storing only the key decay (QDO_INLINE), or reading it from the qdo launch through
    the dh buffer; with its per-step loads issued a step ahead or not; packed sequences, GVA,
    the l2-norm, with and without the final-state gradient. (The launcher's choice, which
    these few heads would not make, is forced.)"""
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

    monkeypatch.setattr(cb, "qdo_inline", lambda BK, par_class: inline)
    monkeypatch.setattr(cb, "DH_PREFETCH_MAX_K", 1 << 20 if prefetch else 0)
    stored = []
    launch_qdo = cb.launch_qdo

    def spy(*args, **kwargs):
        stored.append(kwargs["store_qdo"])
        return launch_qdo(*args, **kwargs)

    monkeypatch.setattr(cb, "launch_qdo", spy)
    check_backward(case)
    assert stored == [not inline]


def test_qdo_inline_where_the_wide_pass_runs(monkeypatch):
    """The pass forms qdo itself at K <= 128 outside the narrow parallelism class (where the
    4-warp, 16-column launch got slower with it), and nowhere with QDO_INLINE off."""
    from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb
    from megatron_gdn.kernels.gated_delta_rule.chunk_fwd import _parallelism_class

    monkeypatch.setattr(cb, "QDO_INLINE", True)
    # S2 (one sequence, 16 value heads), S3 (2 x 32), S1 (4 x 16), K = 256
    assert not cb.qdo_inline(128, _parallelism_class(1 * 16))
    assert cb.qdo_inline(128, _parallelism_class(2 * 32))
    assert cb.qdo_inline(128, _parallelism_class(4 * 16))
    assert not cb.qdo_inline(256, 2)
    monkeypatch.setattr(cb, "QDO_INLINE", False)
    assert not cb.qdo_inline(128, 2)


def test_chunk_bwd_catches_a_wrong_gradient():
    """The comparison above must be able to fail: a 0.1% change of do moves every gradient."""
    case = CASES[0]
    x = make_inputs(case)
    expected = reference_grads(x, case)
    x_bad = dict(x, do=x["do"] * 1.001)
    actual = run_backward(x_bad, case, torch.float32)
    for name in ("q", "k", "g", "beta"):
        with pytest.raises(AssertionError):
            assert_close(actual[name], expected[name], INTERP_FP32_REL, f"d{name} (perturbed)")


def _fused_reference(x, A_log, dt_bias, case: Case):
    leaves = {n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "g", "beta")}
    leaves["A_log"] = A_log.clone().requires_grad_(True)
    leaves["dt_bias"] = dt_bias.clone().requires_grad_(True)
    leaves["h0"] = x["h0"].clone().requires_grad_(True)
    q = leaves["q"] * torch.rsqrt(leaves["q"].pow(2).sum(-1, keepdim=True) + 1e-6)
    k = leaves["k"] * torch.rsqrt(leaves["k"].pow(2).sum(-1, keepdim=True) + 1e-6)
    a = leaves["g"] + leaves["dt_bias"]
    g = -torch.exp(leaves["A_log"]) * torch.nn.functional.softplus(a)
    beta = torch.sigmoid(leaves["beta"])
    cu = torch.tensor(case.cu) if case.cu else None
    o, s = naive_recurrent_gated_delta_rule(q, k, leaves["v"], g, beta, None, leaves["h0"], True, cu)
    ((o * x["do"]).sum() + (s * x["dht"]).sum()).backward()
    return {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("case", [Case(1, 90, 1, 2, 16, 16, cu=(0, 20, 90), l2=True)],
                         ids=lambda c: c.id)
def test_fused_options_end_to_end(case):
    """Forward of chunk.py + this backward with the fused gate, beta sigmoid and l2-norm."""
    x = make_inputs(case, seed=1)
    gen = torch.Generator().manual_seed(2)
    x["g"] = torch.randn(case.B, case.T, case.HV, generator=gen, dtype=torch.float64)
    x["beta"] = torch.randn(case.B, case.T, case.HV, generator=gen, dtype=torch.float64)
    A_log = torch.log(torch.rand(case.HV, generator=gen, dtype=torch.float64) * 15 + 1)
    dt_bias = torch.randn(case.HV, generator=gen, dtype=torch.float64)
    expected = _fused_reference(x, A_log, dt_bias, case)

    to = lambda t: t.float().to(DEVICE).requires_grad_(True)  # noqa: E731
    leaves = {n: to(x[n]) for n in ("q", "k", "v", "g", "beta", "h0")}
    leaves["A_log"] = to(A_log)
    leaves["dt_bias"] = to(dt_bias)
    cu = torch.tensor(case.cu, dtype=torch.int32, device=DEVICE)
    o, s = chunk_gated_delta_rule_triton(
        leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], None, leaves["h0"],
        True, cu, use_qk_l2norm=True, A_log=leaves["A_log"], dt_bias=leaves["dt_bias"],
        use_beta_sigmoid=True,
    )
    ((o * x["do"].float().to(DEVICE)).sum() + (s * x["dht"].float().to(DEVICE)).sum()).backward()
    rel = INTERP_FP32_REL if DEVICE == "cpu" else TF32_REL
    for name in expected:
        assert_close(leaves[name].grad, expected[name], rel, f"d{name}")


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 is wrong under the Triton interpreter (notes)")
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: c.id)
def test_chunk_bwd_bf16_gpu(case):
    """bf16 at the head dims the entry point runs compiled (small heads zero-padded up to
    MIN_COMPILED_HEAD_DIM: at K, V of 16 / 32 the compiled bf16 backward is wrong on H200 with
    triton 3.6), gradients sliced back."""
    from megatron_gdn.kernels.gated_delta_rule.chunk import padded_head_dims

    x = make_inputs(case)
    expected = reference_grads(x, case)
    Kp, Vp = padded_head_dims(case.K, case.V)
    pad = torch.nn.functional.pad
    xp = dict(x, q=pad(x["q"], (0, Kp - case.K)), k=pad(x["k"], (0, Kp - case.K)),
              v=pad(x["v"], (0, Vp - case.V)), do=pad(x["do"], (0, Vp - case.V)))
    for name in ("h0", "dht"):
        if x[name] is not None:
            xp[name] = pad(x[name], (0, Vp - case.V, 0, Kp - case.K))
    actual = run_backward(xp, dataclasses.replace(case, K=Kp, V=Vp), torch.bfloat16,
                          scale=case.K ** -0.5)
    for name in expected:
        got = actual[name]
        if name in ("q", "k"):
            got = got[..., :case.K]
        elif name == "v":
            got = got[..., :case.V]
        elif name == "h0":
            got = got[..., :case.K, :case.V]
        assert_close(got, expected[name], BF16_REL, f"d{name}")


# Every backward kernel and the forward's prepare kernels at the largest head dims of the
# contract (K = 256, V = 512), fp32 (the larger dot operands), compiled for sm_90 with the
# one-stage autotune config of largest BV: the shared memory it reserves must fit a Hopper
# block (fp32 at K = 256 once needed 291 KB on an H200). Pipelined candidates may not fit
# there (the vq launch's two-stage one needs 256 KB): the autotuner skips a config that
# raises OutOfResources, and a kernel's first config (the fixed launch without autotuning)
# has one stage.
# One value head per key head: the group loop reuses the buffers, and compiles G times faster.
# A child process: under TRITON_INTERPRET the kernels cannot be compiled.
_SHARED_SCRIPT = """
from hopper_compile import HOPPER_MAX_SHARED, compile_for_hopper, shared_bytes
from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb

K, V = 256, 512
ptr = {n: "*fp32" for n in ("q", "k", "v", "do", "w", "u", "dv", "h", "dh", "v_new", "dv2", "dq",
                            "dk", "gc", "g", "beta", "q_rstd", "k_rstd", "tm", "dht", "dh0", "dg",
                            "dbeta", "pm", "m2", "kscale", "dk_raw", "dg_part", "dbeta_part")}
ptr.update(cu_seqlens="*i32", chunk_indices="*i32", chunk_offsets="*i32")
common = dict(H=1, HV=1, K=K, V=V, L2=True, HAS_G=True, IS_VARLEN=True)
kernels = [
    (cb._bwd_prep_kernel, dict(BK=64, BV=64, HAS_TM=False, STORE_U=True)),
    (cb._bwd_prep_kernel, dict(BK=64, BV=64, HAS_TM=True, STORE_U=False)),
    (cb._bwd_qdo_kernel, dict(BK=256, STORE_QDO=True)),
    (cb._bwd_dh_kernel, dict(BK=256, USE_DHT=True, USE_H0=True,
                              PREFETCH=cb.dh_prefetch(256), QDO_INLINE=False)),
    # forming qdo itself only at K <= 128 (qdo_inline)
    (cb._bwd_dh_kernel, dict(K=128, V=128, BK=128, USE_DHT=True, USE_H0=True,
                              PREFETCH=cb.dh_prefetch(128), QDO_INLINE=True)),
    (cb._bwd_grad_vq_kernel, dict(BK=256, BKC=64, LOOP_G=1)),
    (cb._bwd_grad_k_kernel, dict(LOOP_G=1)),  # BK from each config
]
for fn, fixed in kernels:
    # the plain (not autotuned) kernel: its one launch config
    configs = getattr(fn, "configs", [cb.qdo_config(K)])
    if fn is cb._bwd_grad_k_kernel:
        chosen = cb._prune_grad_k(configs, {}, K=K)  # every config, as pruned at this K
    else:
        chosen = [max([c for c in configs if c.num_stages == 1] or configs,
                      key=lambda c: (c.kwargs.get("BV", 0), -c.num_warps))]
    for cfg in chosen:
        kernel = compile_for_hopper(fn, ptr, dict(common, **fixed, **cfg.kwargs), cfg.num_warps,
                                    cfg.num_stages, floats=("scale",))
        need = shared_bytes(kernel)
        print(fn.fn.__name__, cfg.kwargs, cfg.num_warps, need)
        assert need <= HOPPER_MAX_SHARED, (fn.fn.__name__, cfg, need)

# the forward's prepare kernel with the column blocks its launcher picks: fp32 as above, and
# bf16 with half dots
from megatron_gdn.kernels.gated_delta_rule import chunk_fwd as cf
prep = dict(H=1, HV=2, K=K, V=V, BKF=256, BK=64, BV=64, GATE_MODE=1, BETA_SIGMOID=True,
            HAS_DT_BIAS=True, L2=True, STORE=True, IS_VARLEN=True, STORE_TM=True)
ptr.update(a_log="*fp32", dt_bias="*fp32", beta_out="*fp32")
half = dict(ptr, **{n: "*bf16" for n in ("k", "v", "w", "u", "tm")})
for fn, pointers, fixed in [(cf._prepare_kernel, ptr, dict(HALF_DOTS=False)),
                            (cf._prepare_kernel, half, dict(HALF_DOTS=True))]:
    cfg = fn.configs[0]
    kernel = compile_for_hopper(fn, pointers, dict(prep, **fixed), cfg.num_warps, cfg.num_stages)
    need = shared_bytes(kernel)
    print(fn.fn.__name__, fixed, cfg.num_warps, need)
    assert need <= HOPPER_MAX_SHARED, (fn.fn.__name__, fixed, need)
print("fits")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the kernels themselves")
def test_kernels_fit_hopper_shared_memory():
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _SHARED_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "fits" in result.stdout, (result.stdout + result.stderr)[-4000:]
