"""chunk_scalar_decay (both backends) against the token recurrence in float64: outputs, final
state and every gradient (q, k, v, g, initial_state); the decoding step; argument errors.

Every case runs for backend "torch" (pure-torch chunked path) and "triton" (on a CPU the
Triton interpreter, fp32 only: it mishandles bf16). With CUDA the cases also run in bf16.
Inputs live on tests/device.py's DEVICE; the torch-path-only checks (float64 exactness, the
decoding step) run on the CPU everywhere.

Legend: B batch, T tokens, G q/k groups, HV value heads, N state dim, P value head dim.
"""
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from device import CUDA, DEVICE
from tolerance import BF16_REL, FP32_REL, TF32_REL, assert_close

from megatron_gdn.kernels.ssd import chunk_scalar_decay, naive_recurrent_scalar_decay, scalar_decay_step
from megatron_gdn.kernels.utils import force_backend

DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
# the float64 chunked torch path vs the float64 recurrence: only summation order differs
FP64_REL = 1e-10


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    G: int
    HV: int
    N: int
    P: int
    cu: Optional[Tuple[int, ...]] = None
    state: str = "none"  # "none", "in", "out", "inout"
    gate: str = "rand"   # "rand" (g in [-1, 0]), "zero" (g = 0), "strong" (g in [-8, -4])
    scale: Optional[float] = None

    @property
    def id(self) -> str:
        parts = [f"B{self.B}-T{self.T}-G{self.G}-HV{self.HV}-N{self.N}-P{self.P}"]
        if self.cu is not None:
            parts.append("cu" + "_".join(str(c) for c in self.cu))
        if self.state != "none":
            parts.append(f"state_{self.state}")
        if self.gate != "rand":
            parts.append(f"g_{self.gate}")
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        return "-".join(parts)


CASES = [
    Case(1, 64, 1, 2, 16, 16),
    Case(2, 100, 1, 2, 16, 16, state="inout"),          # T not a multiple of 64
    Case(1, 37, 2, 4, 16, 32, state="in"),              # T < 64, groups
    Case(2, 1, 1, 2, 16, 16, state="inout"),            # T = 1
    Case(1, 130, 2, 4, 32, 16, gate="strong", state="out"),
    Case(1, 96, 1, 3, 16, 16, gate="zero", state="inout", scale=0.5),
    Case(1, 150, 2, 4, 16, 16, cu=(0, 1, 70, 70, 83, 150), state="inout"),  # packed, length 1 and 0
    Case(1, 129, 1, 2, 16, 16, cu=(0, 64, 65, 129), gate="strong"),
    # the state passes split N = 64 and P = 48 into 32 x 32 tiles (two row blocks, a partial
    # column block)
    Case(1, 100, 1, 2, 64, 48, state="inout"),
]
# R = 12 value heads per group: with up to 8 heads per program of the chunk backward, blocks
# of 4 (three per group); two groups of 2 heads: blocks of 2
HEAD_BLOCK_CASES = [Case(2, 70, 1, 12, 16, 16, state="in"), CASES[4]]


def _inputs(case: Case, dtype, device):
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    B, T, G, HV, N, P = case.B, case.T, case.G, case.HV, case.N, case.P
    q = torch.randn(B, T, G, N, generator=gen) / N ** 0.5
    k = torch.randn(B, T, G, N, generator=gen) / N ** 0.5
    v = torch.randn(B, T, HV, P, generator=gen)
    if case.gate == "zero":
        g = torch.zeros(B, T, HV)
    elif case.gate == "strong":
        g = -4.0 - 4.0 * torch.rand(B, T, HV, generator=gen)
    else:
        g = -torch.rand(B, T, HV, generator=gen)
    rows = B if case.cu is None else len(case.cu) - 1
    h0 = torch.randn(rows, HV, N, P, generator=gen) if case.state in ("in", "inout") else None
    cu = torch.tensor(case.cu, dtype=torch.int32, device=device) if case.cu is not None else None
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    g = g.to(device)
    if h0 is not None:
        h0 = h0.to(device)
    return q, k, v, g, h0, cu


def _run(fn, q, k, v, g, h0, cu, case, do, dht, extra=None):
    """o, final state and the gradients of q, k, v, g, h0 (if given) and then of the `extra`
    keyword tensors (name -> tensor or None; the given ones are passed to fn as leaves)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g)]
    h0_leaf = h0.detach().clone().requires_grad_() if h0 is not None else None
    kw = {n: x.detach().clone().requires_grad_() for n, x in (extra or {}).items() if x is not None}
    want_final = case.state in ("out", "inout")
    o, ht = fn(*leaves, case.scale, h0_leaf, want_final, cu, **kw)
    loss = (o.float() * do).sum()
    if want_final:
        loss = loss + (ht.float() * dht).sum()
    inputs = leaves + ([h0_leaf] if h0_leaf is not None else []) + list(kw.values())
    grads = torch.autograd.grad(loss, inputs)
    return o, ht, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunk_vs_naive(case, dtype, backend):
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("the torch path computes in fp32 whatever the input dtype: fp32 covers it")
    q, k, v, g, h0, cu = _inputs(case, dtype, DEVICE)
    gen = torch.Generator().manual_seed(1)
    rows = case.B if case.cu is None else len(case.cu) - 1
    do = torch.randn(case.B, case.T, case.HV, case.P, generator=gen).to(DEVICE)
    dht = torch.randn(rows, case.HV, case.N, case.P, generator=gen).to(DEVICE)

    def kernel(*args):
        with force_backend(backend):
            return chunk_scalar_decay(*args)

    o, ht, grads = _run(kernel, q, k, v, g, h0, cu, case, do, dht)
    to64 = lambda x: x.double() if x is not None else None
    o_ref, ht_ref, grads_ref = _run(naive_recurrent_scalar_decay, to64(q), to64(k), to64(v), to64(g),
                                    to64(h0), cu, case, to64(do), to64(dht))
    if dtype == torch.bfloat16:
        rel = BF16_REL
    elif backend == "triton" and CUDA:
        rel = TF32_REL
    else:
        rel = FP32_REL
    assert o.dtype == dtype
    assert_close(o, o_ref, rel, "o")
    if case.state in ("out", "inout"):
        assert ht.dtype == torch.float32
        assert_close(ht, ht_ref, rel, "final_state")
    else:
        assert ht is None
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_ref):
        assert_close(a, b, rel, name)


@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("case", HEAD_BLOCK_CASES, ids=lambda c: c.id)
def test_chunk_backward_head_blocks(case, heads, monkeypatch):
    """The chunk backward with one and with several value heads per program (dq, dk summed
    over the block in registers) against the float64 recurrence, Triton only (fp32; bf16 too
    with CUDA)."""
    from megatron_gdn.kernels.ssd import chunk as ssd_chunk

    monkeypatch.setattr(ssd_chunk, "MAX_HEADS_PER_PROGRAM", heads)
    assert (ssd_chunk._heads_per_program(case.HV // case.G) > 1) == (heads > 1)
    test_chunk_vs_naive(case, torch.float32, "triton")


# v read as v * v_scale inside the kernels (the Mamba2 mixer's x * dt), and the skip
# o += d_skip * v (its D x): one case each of the plain, partial chunk with states, groups,
# strong decay, packed, several heads per program; d_skip none, per head, per head and column
VALUE_SCALE_CASES = [CASES[1], CASES[2], CASES[4], CASES[6], HEAD_BLOCK_CASES[0]]


@pytest.mark.parametrize("skip", [None, "head", "head_col"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", VALUE_SCALE_CASES, ids=lambda c: c.id)
def test_value_scale(case, dtype, backend, skip):
    """chunk_scalar_decay(..., v_scale=s, d_skip=D) against the float64 recurrence on v * s
    plus D v: outputs, final state and every gradient, v_scale's and D's among them (s > 0 as
    Mamba2's dt, some zero)."""
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("the torch path computes in fp32 whatever the input dtype: fp32 covers it")
    q, k, v, g, h0, cu = _inputs(case, dtype, DEVICE)
    gen = torch.Generator().manual_seed(2)
    rows = case.B if case.cu is None else len(case.cu) - 1
    vs = torch.nn.functional.softplus(torch.randn(case.B, case.T, case.HV, generator=gen) - 1.0)
    vs[:, ::7] = 0.0
    vs = vs.to(DEVICE)
    dsk = {None: None, "head": torch.randn(case.HV, generator=gen),
           "head_col": torch.randn(case.HV, case.P, generator=gen)}[skip]
    dsk = dsk.to(DEVICE) if dsk is not None else None
    do = torch.randn(case.B, case.T, case.HV, case.P, generator=gen).to(DEVICE)
    dht = torch.randn(rows, case.HV, case.N, case.P, generator=gen).to(DEVICE)

    def kernel(*args, **kw):
        with force_backend(backend):
            return chunk_scalar_decay(*args, **kw)

    def reference(q_, k_, v_, g_, *rest, v_scale, d_skip=None):
        o, ht = naive_recurrent_scalar_decay(q_, k_, v_ * v_scale.unsqueeze(-1), g_, *rest)
        if d_skip is not None:
            o = o + d_skip.reshape(case.HV, -1) * v_
        return o, ht

    o, ht, grads = _run(kernel, q, k, v, g, h0, cu, case, do, dht, {"v_scale": vs, "d_skip": dsk})
    to64 = lambda x: x.double() if x is not None else None  # noqa: E731
    o_ref, ht_ref, grads_ref = _run(reference, *(to64(x) for x in (q, k, v, g, h0)), cu, case, to64(do),
                                    to64(dht), {"v_scale": to64(vs), "d_skip": to64(dsk)})
    rel = BF16_REL if dtype == torch.bfloat16 else (TF32_REL if backend == "triton" and CUDA else FP32_REL)
    assert o.dtype == dtype
    assert_close(o, o_ref, rel, "o")
    if case.state in ("out", "inout"):
        assert_close(ht, ht_ref, rel, "final_state")
    names = ["dq", "dk", "dv", "dg"] + ["dh0"] * (h0 is not None) + ["dv_scale"] + ["dd_skip"] * (dsk is not None)
    assert len(grads) == len(names)
    for name, a, b in zip(names, grads, grads_ref):
        assert_close(a, b, rel, name)


def test_value_scale_is_checked():
    q, k, v, g, _, _ = _inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="v_scale"):
        chunk_scalar_decay(q, k, v, g, v_scale=torch.ones(1, 64, 3))
    with pytest.raises(TypeError, match="v_scale"):
        chunk_scalar_decay(q, k, v, g, v_scale=torch.ones(1, 64, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="d_skip"):
        chunk_scalar_decay(q, k, v, g, d_skip=torch.ones(3))
    with pytest.raises(ValueError, match="d_skip"):
        chunk_scalar_decay(q, k, v, g, d_skip=torch.ones(2, 8))
    with pytest.raises(TypeError, match="d_skip"):
        chunk_scalar_decay(q, k, v, g, d_skip=torch.ones(2, dtype=torch.int64))


# P = 32 and 64 value columns: split once, and twice (64 -> 32 -> 16), packed with states
COLUMN_SPLIT_CASES = [Case(2, 100, 1, 2, 16, 32, state="inout"),
                      Case(1, 150, 2, 4, 32, 64, cu=(0, 1, 70, 70, 83, 150), state="inout", gate="strong")]


@pytest.mark.parametrize("case", COLUMN_SPLIT_CASES, ids=lambda c: c.id)
def test_chunk_backward_column_split(case, monkeypatch):
    """The backward's fallback where the chunk backward's tiles exceed the GPU's shared
    memory (fp32 at N x P = 128 x 64 on Hopper): the value columns in halves, recursively,
    against the float64 recurrence. The launch limit is simulated (the interpreter has none):
    the chunk backward of more than 16 columns raises Triton's OutOfResources."""
    import triton

    from megatron_gdn.kernels.ssd import chunk as ssd_chunk

    real, widths = ssd_chunk._ssd_bwd, []

    def limited(q, k, v, *args):
        widths.append(v.shape[-1])
        if v.shape[-1] > 16:
            raise triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")
        return real(q, k, v, *args)

    monkeypatch.setattr(ssd_chunk, "_ssd_bwd", limited)
    monkeypatch.setattr(ssd_chunk, "_TOO_WIDE", set())
    test_chunk_vs_naive(case, torch.float32, "triton")
    assert widths[0] == case.P and min(widths) == 16 and widths.count(16) == case.P // 16
    # the widths that did not fit are remembered: a second backward launches only 16 columns
    widths.clear()
    test_chunk_vs_naive(case, torch.float32, "triton")
    assert widths == [16] * (case.P // 16)


def test_column_split_needs_whole_blocks():
    from megatron_gdn.kernels.ssd import chunk as ssd_chunk

    with pytest.raises(ValueError, match="P=48 value columns into 4 blocks"):
        ssd_chunk.ssd_bwd_columns(*[None] * 2, torch.empty(1, 1, 1, 48), *[None] * 6, parts=4)


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=lambda c: c.id)
def test_torch_path_fp64_exact(case):
    q, k, v, g, h0, cu = _inputs(case, torch.float64, torch.device("cpu"))
    h0 = h0.double() if h0 is not None else None
    with force_backend("torch"):
        o, ht = chunk_scalar_decay(q, k, v, g.double(), case.scale, h0, True, cu)
    o_ref, ht_ref = naive_recurrent_scalar_decay(q, k, v, g.double(), case.scale, h0, True, cu)
    assert_close(o, o_ref, FP64_REL, "o")
    assert_close(ht, ht_ref, FP64_REL, "final_state")


def test_decoding_step_continues_the_chunked_state():
    """Prefill T tokens with the chunked kernel, decode 3 more with the step: the same outputs
    and state as the recurrence over all T + 3 tokens."""
    case = Case(2, 70, 2, 4, 16, 8)
    q, k, v, g, _, _ = _inputs(case, torch.float32, torch.device("cpu"))
    T0 = 67
    o_ref, ht_ref = naive_recurrent_scalar_decay(q, k, v, g, 0.7, None, True)
    with force_backend("torch"):
        _, state = chunk_scalar_decay(q[:, :T0], k[:, :T0], v[:, :T0], g[:, :T0], 0.7, None, True)
    outs = []
    for t in range(T0, case.T):
        o_t, state = scalar_decay_step(q[:, t], k[:, t], v[:, t], g[:, t], state, 0.7)
        outs.append(o_t)
    assert_close(torch.stack(outs, dim=1), o_ref[:, T0:], FP32_REL, "o (decode)")
    assert_close(state, ht_ref, FP32_REL, "state (decode)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors_name_the_argument(backend):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 8, 2, 16, generator=gen).to(DEVICE)
    v = torch.randn(1, 8, 3, 16, generator=gen).to(DEVICE)
    g = -torch.rand(1, 8, 3, generator=gen).to(DEVICE)
    with force_backend(backend):
        with pytest.raises(ValueError, match="HV=3"):
            chunk_scalar_decay(q, q, v, g)
        v = torch.randn(1, 8, 4, 16, generator=gen).to(DEVICE)
        with pytest.raises(ValueError, match="g must be"):
            chunk_scalar_decay(q, q, v, g)
        g = -torch.rand(1, 8, 4, generator=gen).to(DEVICE)
        with pytest.raises(TypeError, match="k has dtype"):
            chunk_scalar_decay(q, q.half(), v, g)
        with pytest.raises(ValueError, match="initial_state"):
            chunk_scalar_decay(q, q, v, g, initial_state=torch.zeros(2, 4, 16, 16, device=DEVICE))
        with pytest.raises(ValueError, match="cu_seqlens must end"):
            chunk_scalar_decay(q, q, v, g, cu_seqlens=torch.tensor([0, 5], device=DEVICE))


def test_profile_stages_runs_every_launch():
    """benchmarks/profile_ssd.py (the GPU round's SSD stage split) runs the backward's launches
    one by one: at a toy shape here (interpreter on the CPU), every stage timed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import profile_ssd

    row = profile_ssd.ssd_stages(1, 70, heads=4, headdim=16, state=16, dtype=torch.float32,
                                 iters=1, warmup=0, device=DEVICE.type)
    for key in ("fwd_cumsum_ms", "fwd_state_ms", "fwd_output_ms", "bwd_dh_ms", "bwd_chunk_ms",
                "bwd_group_sums_ms", "fwd_total_ms", "fwd_bwd_total_ms",
                "bwd_state_dh_overlap_ms", "bwd_state_dh_in_line_ms"):
        assert row[key] > 0, key
    assert row["group_partials_mb"] == 2 * 70 * 4 // row["heads_per_program"] * 16 * 4 / 1e6


@pytest.mark.parametrize("with_vs", [False, True], ids=["v", "v_scale_d_skip"])
@pytest.mark.parametrize("overlap", [True, False])
def test_backward_pieces_are_the_backward(overlap, with_vs, monkeypatch):
    """ssd_bwd is its pieces run in turn (what profile_ssd.py times one by one): the same
    gradients, bit for bit, from the pieces called directly; with the states recomputed on a
    side stream beside the reverse pass (OVERLAP_STREAMS, on a GPU) or in line."""
    from megatron_gdn.kernels.ssd import chunk as sc

    if not (CUDA or sc.INTERPRET):
        pytest.skip("the Triton kernels need a GPU or the interpreter")
    gen = torch.Generator().manual_seed(4)
    B, T, G, HV, N, P = 2, 90, 1, 4, 16, 16
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, k, v, do = rnd(B, T, G, N), rnd(B, T, G, N), rnd(B, T, HV, P), rnd(B, T, HV, P)
    g = -torch.rand(B, T, HV, generator=gen).to(DEVICE)
    vs = torch.rand(B, T, HV, generator=gen).to(DEVICE) if with_vs else None
    dsk = torch.randn(HV, P, generator=gen).to(DEVICE) if with_vs else None
    layout = sc.make_chunk_layout(None, B, T)
    gc = sc.ssd_cumsum(g, layout)
    monkeypatch.setattr(sc, "OVERLAP_STREAMS", overlap)
    whole = sc.ssd_bwd(q, k, v, gc, 0.5, None, do, None, layout, vs, dsk)
    h, _ = sc.ssd_state_fwd(k, v, gc, layout, None, False, vs=vs)
    dh, dh0 = sc.ssd_state_bwd(q, do, gc, h, None, False, 0.5, layout)
    dq_h, dk_h, dv, dg, dvs, ddsk = sc.ssd_chunk_bwd(q, k, v, gc, h, dh, do, 0.5, layout, vs, dsk)
    dq, dk = sc.ssd_group_sums(dq_h, dk_h, G, q.dtype, k.dtype)
    assert dh0 is None and whole[4] is None
    assert (dvs is None) == (whole[5] is None) == (not with_vs)
    dd = None if ddsk is None else ddsk.sum(0)
    for a, b in zip((dq, dk, dv, dg, dvs, dd), whole[:4] + whole[5:]):
        assert (a is None and b is None) or torch.equal(a, b)
