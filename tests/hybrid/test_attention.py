"""The attention cores of megatron_gdn.hybrid.attention.

Single process: causal and sliding-window attention, GQA, packed documents, against a float64
loop over the rule "same document, key not after the query, distance < window" written here
independently of the module's mask code. Context parallel (real gloo processes, zigzag layout,
dense rows and packed THD): outputs and dq/dk/dv of every rank against the one-process result
on the full sequence, with windows that cross piece and rank boundaries (a window longer than
a piece reaches back over several pieces and ranks).
"""
import types

import pytest
import torch

from megatron_gdn.hybrid.attention import MaskSpec, SDPACoreAttention, masked_attention, reference_attention
from megatron_gdn.testing.dist import run_distributed
from tolerance import FP32_REL, assert_close


def _loop_reference(q, k, v, cu, window, scale):
    """q [T, B, H, D], k/v [T, B, G, D] in float64, documents cut at cu; explicit per query."""
    T, B, H, D = q.shape
    G = k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for start, end in zip(cu[:-1], cu[1:]):
        for t in range(start, end):
            lo = start if window is None else max(start, t - window + 1)
            for h in range(H):
                g = h // (H // G)
                s = torch.einsum("bd,sbd->bs", q[t, :, h], k[lo:t + 1, :, g]) * scale
                out[t, :, h] = torch.einsum("bs,sbd->bd", s.softmax(-1), v[lo:t + 1, :, g])
    return out


def _tags(cu):
    pos, doc = [], []
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        pos += list(range(b - a))
        doc += [n] * (b - a)
    return torch.tensor(pos), torch.tensor(doc)


@pytest.mark.parametrize(
    "T,B,H,G,D,cu,window",
    [
        (24, 2, 4, 4, 16, None, None),
        (24, 2, 4, 2, 16, None, 5),
        (33, 1, 4, 1, 8, [0, 7, 20, 33], None),
        (33, 1, 6, 2, 8, [0, 7, 20, 33], 4),
        (16, 3, 2, 2, 8, None, 40),
    ],
    ids=lambda x: str(x),
)
def test_masked_attention_matches_loop(T, B, H, G, D, cu, window):
    torch.manual_seed(0)
    q = torch.randn(T, B, H, D)
    k = torch.randn(T, B, G, D)
    v = torch.randn(T, B, G, D)
    cu = [0, T] if cu is None else cu
    pos, doc = _tags(cu)
    mask = MaskSpec(pos, doc, pos, doc, window, plain=len(cu) == 2)
    scale = D ** -0.5
    out = masked_attention(q, k, v, mask, scale)
    assert_close(out, _loop_reference(q, k, v, cu, window, scale), FP32_REL, "o")


def test_window_one_is_identity_on_values():
    """window=1: every query sees only itself, so o_t = v_t (a check that cannot pass by luck)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 12, 2, 2, 8).unbind(0)
    pos = torch.arange(12)
    out = masked_attention(q, k, v, MaskSpec(pos, torch.zeros_like(pos), pos, torch.zeros_like(pos), 1), 0.3)
    assert_close(out, v, FP32_REL, "o")


def _check_backend_against_loop(q, k, v, mask, cu, backend):
    """Output and dq / dk / dv of masked_attention(backend) against autograd through the loop
    reference (float64 leaves)."""
    scale = q.shape[-1] ** -0.5
    out = masked_attention(q, k, v, mask, scale, backend=backend)
    ref = _loop_reference(q, k, v, cu, mask.window, scale)
    assert_close(out, ref, 1e-12, "o")
    dout = torch.randn_like(out)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    want = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, 1e-12, name)


# ------------------------------------------------------- sliding window from causal blocks
@pytest.mark.parametrize("T,H,G,window", [(37, 3, 3, 5), (64, 2, 2, 16), (65, 2, 1, 16),
                                          (10, 2, 2, 1), (7, 2, 2, 20), (33, 4, 2, 32)],
                         ids=lambda x: str(x))
def test_blocks_backend_matches_loop(T, H, G, window):
    """backend='blocks' (swa_blocks.py: two causal attentions per window-sized block, merged by
    log-sum-exp; here its torch kernel in float64): output and dq / dk / dv against autograd
    through the loop reference; T not a multiple of the window, window 1 and above T, GQA."""
    torch.manual_seed(3)
    B, D = 2, 8
    q = torch.randn(T, B, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, B, G, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(T, B, G, D, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(T)
    mask = MaskSpec(pos, torch.zeros_like(pos), pos, torch.zeros_like(pos), window, plain=True)
    _check_backend_against_loop(q, k, v, mask, [0, T], "blocks")


def test_blocks_backend_rejects_what_it_cannot_do():
    q = torch.randn(8, 1, 2, 4)
    pos = torch.arange(8)
    zeros = torch.zeros_like(pos)
    with pytest.raises(ValueError, match="sliding windows over one plain sequence"):
        masked_attention(q, q, q, MaskSpec(pos, zeros, pos, zeros, None, plain=True), 0.5,
                         backend="blocks")
    with pytest.raises(ValueError, match="dropout"):
        masked_attention(q, q, q, MaskSpec(pos, zeros, pos, zeros, 3, plain=True), 0.5,
                         dropout_p=0.1, backend="blocks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash kernels: GPU only")
def test_blocks_flash_bf16_matches_dense():
    """The flash kernels of the block decomposition (torch's flash-attention ops, bf16) against
    the dense band mask in float32, output and gradients, T not a multiple of the window."""
    torch.manual_seed(4)
    T, B, H, D, window = 1000, 2, 4, 64, 256
    x = [torch.randn(T, B, H, D, device="cuda") for _ in range(3)]
    pos = torch.arange(T, device="cuda")
    zeros = torch.zeros_like(pos)
    mask = MaskSpec(pos, zeros, pos, zeros, window, plain=True)
    _check_bf16_against_dense(x, mask, "blocks")


def _check_bf16_against_dense(x, mask, backend):
    """masked_attention(backend) in bf16 against the dense mask in float32 (inputs x: q, k, v
    in float32 on the GPU): output and dq / dk / dv within the bf16 tolerance."""
    dout = torch.randn_like(x[0])
    scale = x[0].shape[-1] ** -0.5

    def run(dtype, name):
        leaves = [t.to(dtype).requires_grad_(True) for t in x]
        out = masked_attention(*leaves, mask, scale, backend=name)
        grads = torch.autograd.grad((out.float() * dout).sum(), leaves)
        return [out] + list(grads)

    got = run(torch.bfloat16, backend)
    want = run(torch.float32, "dense")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(a.float(), b, 1e-2, name)


# ------------------------------------------------- varlen kernels (packed rows, with a window)
@pytest.mark.parametrize("T,B,H,G,cu,window", [
    (37, 2, 3, 3, None, 5), (64, 1, 2, 1, None, 16), (10, 2, 2, 2, None, 1),
    (33, 1, 4, 2, [0, 7, 20, 33], 4), (33, 1, 2, 2, [0, 1, 1, 20, 33], None),
    (40, 1, 2, 2, [0, 40], 50),
], ids=lambda x: str(x))
def test_varlen_backend_matches_loop(T, B, H, G, cu, window):
    """backend='varlen' (swa_varlen.py; here its torch kernel in float64): rows back to back or
    packed documents (an empty one and a one-token one included), full causal or a window
    (1, inside, above the length), GQA: output and dq / dk / dv against the loop reference."""
    torch.manual_seed(5)
    D = 8
    q = torch.randn(T, B, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, B, G, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(T, B, G, D, dtype=torch.float64, requires_grad=True)
    plain = cu is None
    pos, doc = _tags([0, T] if plain else cu)
    mask = MaskSpec(pos, doc, pos, doc, window, plain=plain,
                    cu_seqlens=None if plain else tuple(cu))
    _check_backend_against_loop(q, k, v, mask, [0, T] if plain else cu, "varlen")


def test_varlen_backend_rejects_what_it_cannot_do():
    from megatron_gdn.hybrid.swa_varlen import varlen_causal_attention

    q = torch.randn(8, 1, 2, 4)
    pos, doc = _tags([0, 3, 8])
    with pytest.raises(ValueError, match="cu_seqlens"):  # packed, but no boundaries given
        masked_attention(q, q, q, MaskSpec(pos, doc, pos, doc, 3), 0.5, backend="varlen")
    with pytest.raises(ValueError, match="dropout"):
        masked_attention(q, q, q, MaskSpec(pos, doc, pos, doc, 3, cu_seqlens=(0, 3, 8)), 0.5,
                         dropout_p=0.1, backend="varlen")
    with pytest.raises(ValueError, match="rise from 0"):
        varlen_causal_attention(q[:, 0], q[:, 0], q[:, 0], [0, 5], 3, 0.5, kernel="math")
    with pytest.raises(ValueError, match="window"):
        varlen_causal_attention(q[:, 0], q[:, 0], q[:, 0], [0, 8], 0, 0.5, kernel="math")


def test_core_thd_gives_the_varlen_backend_its_documents(monkeypatch):
    """SDPACoreAttention on packed THD input passes the document boundaries in its MaskSpec
    (what the varlen kernels cut at); the output equals the loop reference."""
    from megatron.core.packed_seq_params import PackedSeqParams

    import megatron_gdn.hybrid.attention as attn

    seen = []
    real = attn.masked_attention

    def spy(q, k, v, mask, *args, **kwargs):
        seen.append(mask.cu_seqlens)
        return real(q, k, v, mask, *args, **dict(kwargs, backend="varlen"))

    monkeypatch.setattr(attn, "masked_attention", spy)
    torch.manual_seed(6)
    T, H, D, cu = 21, 2, 8, [0, 9, 10, 21]
    q, k, v = (torch.randn(T, H, D, dtype=torch.float64) for _ in range(3))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                             max_seqlen_q=12, max_seqlen_kv=12)
    out = _core(window=4)(q, k, v, None, packed_seq_params=params)
    assert seen == [tuple(cu)]
    ref = _loop_reference(q[:, None], k[:, None], v[:, None], cu, 4, D ** -0.5)
    assert_close(out, ref.reshape(T, H * D), 1e-12, "o")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash kernels: GPU only")
@pytest.mark.parametrize("B,G,cu,window", [(2, 4, None, 256), (1, 2, [0, 1, 300, 301, 1000], 128),
                                           (1, 4, [0, 500, 1000], None)], ids=lambda x: str(x))
def test_varlen_flash_bf16_matches_dense(B, G, cu, window):
    """torch's FlashAttention-2 varlen kernels with the window (bf16) against the dense band
    mask in float32: output and gradients; rows back to back, packed documents (one-token ones
    included), GQA, full causal packed documents."""
    from megatron_gdn.hybrid.swa_varlen import varlen_flash_supported

    torch.manual_seed(4)
    T, H, D = 1000, 4, 64
    if not varlen_flash_supported(torch.empty(1, H, D, device="cuda", dtype=torch.bfloat16)):
        pytest.fail("this torch build's flash varlen kernels do not run with a window here")
    xs = [torch.randn(T, B, n, D, device="cuda") for n in (H, G, G)]
    pos, doc = _tags([0, T] if cu is None else cu)
    pos, doc = pos.cuda(), doc.cuda()
    mask = MaskSpec(pos, doc, pos, doc, window, plain=cu is None,
                    cu_seqlens=None if cu is None else tuple(cu))
    _check_bf16_against_dense(xs, mask, "varlen")


def _core(window, cp_group=None, head_dim=8, backend="auto"):
    config = types.SimpleNamespace(kv_channels=head_dim, attention_dropout=0.0,
                                   apply_query_key_layer_scaling=False, softmax_type="vanilla")
    pg = types.SimpleNamespace(cp=cp_group)
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=None, pg_collection=pg,
                             window=window, backend=backend)


def test_core_module_layouts():
    """sbhd and THD inputs give [s, b, H*D] / [t, H*D]; THD keeps documents apart."""
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(2)
    T, H, G, D = 20, 4, 2, 8
    q, k, v = torch.randn(T, 1, H, D), torch.randn(T, 1, G, D), torch.randn(T, 1, G, D)
    core = _core(window=6)
    out = core(q, k, v, None)
    assert out.shape == (T, 1, H * D)
    assert_close(out.view(T, 1, H, D), _loop_reference(q, k, v, [0, T], 6, D ** -0.5), FP32_REL, "sbhd")
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=11, max_seqlen_kv=11)
    out = core(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=psp)
    assert out.shape == (T, H * D)
    assert_close(out.view(T, 1, H, D), _loop_reference(q, k, v, [0, 9, 20], 6, D ** -0.5), FP32_REL, "thd")


def test_core_rejects_bad_window():
    with pytest.raises(ValueError, match="window"):
        _core(window=0)


# ------------------------------------------------------------------------- context parallel
CP_CASES = [
    # (name, W, cu (None: dense rows), B, window)
    ("dense-full", 2, None, 2, None),
    ("dense-swa-crosses-piece", 2, None, 2, 11),
    ("dense-swa-longer-than-piece", 2, None, 1, 21),
    ("thd-full", 2, [0, 8, 32, 48], 1, None),
    ("thd-swa", 2, [0, 8, 32, 48], 1, 7),
    ("thd-swa-longer-than-piece", 2, [0, 8, 32, 48], 1, 13),
]
CP4_CASES = [
    ("dense-swa-4ranks", 4, None, 1, 10),
    ("thd-full-4ranks", 4, [0, 16, 48], 1, None),
    ("thd-swa-4ranks", 4, [0, 16, 48], 1, 9),
]
TOTAL, H, G, D = 32, 4, 2, 8


def _thd_params(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_t = torch.tensor(cu, dtype=torch.int32)
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                           cu_seqlens_q_padded=cu_t, cu_seqlens_kv_padded=cu_t,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _run_core(core, q, k, v, dout, cu):
    """Forward + backward of the core; q/k/v [T, B, heads, D] (B == 1 for THD)."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    if cu is None:
        out = core(q, k, v, None)
    else:
        out = core(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=_thd_params(cu))
        out = out.unsqueeze(1)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _cp_worker(cases, backend="auto"):
    import torch.distributed as dist

    from megatron_gdn.parallel.zigzag import zigzag_shard

    W, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    for name, world, cu, B, window in cases:
        if world != W:
            continue
        torch.manual_seed(10)
        T = TOTAL if cu is None else cu[-1]
        q = torch.randn(T, B, H, D, dtype=torch.float64)
        k = torch.randn(T, B, G, D, dtype=torch.float64)
        v = torch.randn(T, B, G, D, dtype=torch.float64)
        dout = torch.randn(T, B, H * D, dtype=torch.float64)
        expected = _run_core(_core(window), q, k, v, dout, cu)
        local = [zigzag_shard(x, 0, W, rank, cu) for x in (q, k, v, dout)]
        got = _run_core(_core(window, dist.group.WORLD, backend=backend), *local, cu)
        results[name] = [(g, zigzag_shard(e, 0, W, rank, cu)) for g, e in zip(got, expected)]
    return results


def _check(results_by_rank, cases):
    for name, *_ in cases:
        for rank, results in enumerate(results_by_rank):
            for label, (got, want) in zip(("o", "dq", "dk", "dv"), results[name]):
                assert_close(got, want, FP32_REL, f"{name} rank {rank} {label}")


def test_cp2_attention_cores():
    _check(run_distributed(_cp_worker, world_size=2, args=(CP_CASES,), enable_cpu=False), CP_CASES)


def test_cp4_attention_cores():
    _check(run_distributed(_cp_worker, world_size=4, args=(CP4_CASES,), enable_cpu=False), CP4_CASES)


def _cp_worker_fa3(cases):
    """_cp_worker with FA3's calls written in torch (_fake_fa3) and taken as supported: the CP
    pieces go through MaskSpec.segments, one call per piece; returns the results and the calls."""
    from megatron_gdn.hybrid import attention as attn_mod
    from megatron_gdn.hybrid import swa_fa3

    calls = []
    fake = _fake_fa3(calls)
    swa_fa3._interface = lambda: fake
    attn_mod.fa3_supported = lambda q: True
    results = _cp_worker(cases, backend="fa3")
    return results, [(c["kind"], tuple(c["q"].shape), tuple(c["k"].shape) if "k" in c else None)
                     for c in calls]


@pytest.mark.parametrize("world,cases", [(2, CP_CASES), (4, CP4_CASES)])
def test_cp_attention_cores_on_fa3_calls(world, cases):
    """Under CP the cores give FA3 one call per local piece (its keys: the gathered prefix of
    its sequence, or its valid halo and itself), equal to the one-process result."""
    out = run_distributed(_cp_worker_fa3, world_size=world, args=(cases,), enable_cpu=False)
    _check([r for r, _ in out], cases)
    for rank, (_, calls) in enumerate(out):
        cp_calls = [c for c in calls if c[0] == "dense" and c[2][1] > c[1][1]]
        # every case has at least one piece whose keys reach before it (not rank 0's first piece)
        assert len(cp_calls) >= len(cases), (rank, calls)


def test_segment_plan_refuses_what_fa3_cannot_express():
    from megatron_gdn.hybrid.attention import _segment_plan

    pos = torch.arange(8)
    doc = torch.zeros(8, dtype=torch.long)
    # queries 4..7 with keys 0..7 in order: one slice, the keys reach back to 0
    assert _segment_plan(pos[4:], doc[4:], pos, doc, None) == ((0, 4, (0, 8)),)
    # keys out of order: the rows sorted by position
    perm = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    (a, b, rows), = _segment_plan(pos[4:], doc[4:], pos[perm], doc, None)
    assert (a, b) == (0, 4) and rows.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    # a key position missing (6): no plan
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 7])
    assert _segment_plan(pos[4:], doc[4:], pos[keep], doc[keep], None) is None
    # a key position twice: no plan
    dup = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 7])
    assert _segment_plan(pos[4:], doc[4:], pos[dup], torch.zeros(9, dtype=torch.long), None) is None
    # two query runs (a gap in positions) and a window: each run reads back window - 1
    q_pos = torch.tensor([2, 3, 6, 7])
    plan = _segment_plan(q_pos, torch.zeros(4, dtype=torch.long), pos, doc, 3)
    assert plan == ((0, 2, (0, 4)), (2, 4, (4, 8)))


def test_cp_check_can_fail():
    """Cutting the halo (keys of the local pieces only) must change the SWA result."""
    torch.manual_seed(3)
    T, window = 16, 5
    q, k, v = torch.randn(T, 1, 2, 4), torch.randn(T, 1, 2, 4), torch.randn(T, 1, 2, 4)
    pos = torch.arange(T)
    doc = torch.zeros(T, dtype=torch.long)
    full = masked_attention(q, k, v, MaskSpec(pos, doc, pos, doc, window), 0.5)
    # second half alone, as if the preceding piece's tail were not exchanged
    half = masked_attention(q[8:], k[8:], v[8:], MaskSpec(pos[8:], doc[8:], pos[8:], doc[8:], window), 0.5)
    with pytest.raises(AssertionError):
        assert_close(half, full[8:], FP32_REL, "cut halo")


# --------------------------------------------------------------- cuDNN band attention (swa_cudnn)
def _band_ops_in_torch(monkeypatch):
    """swa_cudnn's two kernel calls replaced by the same attention written in torch (the CPU
    has no cuDNN): checks the autograd wiring around them, not cuDNN."""
    from megatron_gdn.hybrid import swa_cudnn as sc

    def fwd(q, k, v, scale, window):
        o = sc.band_reference(q, k, v, window, scale)
        s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
        i = torch.arange(q.shape[-2])
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= (i[:, None] - i[None, :]) < window
        lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1, keepdim=True).float()
        return o, lse

    def bwd(do, q, k, v, o, lse, scale, window):
        with torch.enable_grad():  # autograd runs a Function's backward without grad mode
            ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
            out = sc.band_reference(*ins, window, scale)
            return [g.to(q.dtype) for g in torch.autograd.grad(out, ins, do.double())]

    monkeypatch.setattr(sc, "_fwd_op", fwd)
    monkeypatch.setattr(sc, "_bwd_op", bwd)
    return sc


@pytest.mark.parametrize("window", [None, 1, 7, 40])
def test_cudnn_band_wiring_matches_the_loop(monkeypatch, window):
    sc = _band_ops_in_torch(monkeypatch)
    B, H, T, D = 2, 3, 37, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, T, D, dtype=torch.float64, generator=gen)
    out = sc.cudnn_causal_attention(q, k, v, window, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), do)
    # the oracle of the other tests: the [T, B, H, D] float64 loop over the window rule
    pos = torch.arange(T)
    doc = torch.zeros(T, dtype=torch.long)
    ref_in = [x.detach().permute(2, 0, 1, 3).clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, MaskSpec(pos, doc, pos, doc, window), 0.3)
    ref_grads = torch.autograd.grad(ref, ref_in, do.permute(2, 0, 1, 3))
    torch.testing.assert_close(out.permute(2, 0, 1, 3), ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.permute(2, 0, 1, 3), r, rtol=1e-10, atol=1e-10)


def test_cudnn_backend_refuses_clearly_where_it_cannot_run():
    from megatron_gdn.hybrid.swa_cudnn import cudnn_causal_attention, cudnn_swa_supported

    q = torch.randn(4, 1, 2, 8)
    pos = torch.arange(4)
    doc = torch.zeros(4, dtype=torch.long)
    assert not cudnn_swa_supported(q.permute(1, 2, 0, 3))  # the CPU
    with pytest.raises(ValueError, match="nvidia-cudnn-frontend"):
        masked_attention(q, q, q, MaskSpec(pos, doc, pos, doc, 2, plain=True), 0.5, backend="cudnn")
    with pytest.raises(ValueError, match="plain sequences"):
        masked_attention(q, q, q, MaskSpec(pos, doc, pos, doc, 2, cu_seqlens=(0, 2, 4)), 0.5,
                         backend="cudnn")
    with pytest.raises(ValueError, match="window must be >= 1"):
        cudnn_causal_attention(*(q.permute(1, 2, 0, 3),) * 3, 0, 0.5)


def _check_against_dense_fp32(q, k, v, mask, scale, backend):
    """masked_attention on `backend` (bf16 inputs) against the dense-mask reference in fp32:
    the output and every gradient within 1e-2."""
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    out = masked_attention(*ins, mask, scale, backend=backend)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, do)
    ref_ins = [x.float().clone().requires_grad_() for x in (q, k, v)]
    ref = masked_attention(*ref_ins, mask, scale, backend="dense")
    ref_grads = torch.autograd.grad(ref, ref_ins, do.float())
    for a, b in [(out, ref), *zip(grads, ref_grads)]:
        err = ((a.float() - b).norm() / b.norm()).item()
        assert err < 1e-2, (backend, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 128, 1000])
def test_cudnn_band_on_gpu(window):
    from megatron_gdn.hybrid.swa_cudnn import cudnn_swa_supported

    T, B, H, D = 1500, 2, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(T, B, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    if not cudnn_swa_supported(q.permute(1, 2, 0, 3)):
        pytest.skip("nvidia-cudnn-frontend not installed, or its band check failed here")
    pos = torch.arange(T, device="cuda")
    doc = torch.zeros(T, dtype=torch.long, device="cuda")
    mask = MaskSpec(pos, doc, pos, doc, window, plain=True)
    _check_against_dense_fp32(q, k, v, mask, D ** -0.5, "cudnn")


# --------------------------------------------------------- FlashAttention-3 (swa_fa3, optional)
def _fake_fa3(calls):
    """FA3's two entry points as its documentation states them, written in torch (the CPU has
    no FA3): q [B, T, H, D] (or [N, H, D] with cu_seqlens), k / v [B, Tk, G, D] with G | H
    heads; causal, aligned to the bottom right (query t is key position t + Tk - T), with
    window_size (left, 0) keeps key j for query t iff t' - left <= j <= t', t' = t + Tk - T.
    `calls` records what the wrapper passed, to check the window conversion and the layout."""
    def attend(q, k, v, scale, left):
        T, Tk, H = q.shape[-3], k.shape[-3], q.shape[-2]
        k, v = (x.repeat_interleave(H // x.shape[-2], dim=-2) for x in (k, v))
        s = torch.einsum("...thd,...shd->...hts", q, k) * scale
        t = torch.arange(T)[:, None] + (Tk - T)  # bottom-right: the last query sees the last key
        j = torch.arange(Tk)[None, :]
        allowed = j <= t
        if left >= 0:
            allowed &= j >= t - left
        return torch.einsum("...hts,...shd->...thd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)

    def dense(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
        calls.append(dict(kind="dense", q=q, k=k, causal=causal, window_size=window_size))
        assert causal and window_size[1] == 0
        return attend(q, k, v, softmax_scale, window_size[0])

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, window_size=(-1, -1)):
        calls.append(dict(kind="varlen", q=q, cu=cu_q, max=max_q, causal=causal, window_size=window_size))
        assert causal and window_size[1] == 0 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        cu = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(cu, cu[1:]))
        return torch.cat([attend(q[a:b], k[a:b], v[a:b], softmax_scale, window_size[0])
                          for a, b in zip(cu, cu[1:])])

    return types.SimpleNamespace(why="", dense=dense, varlen=varlen)


@pytest.mark.parametrize("window", [None, 1, 5, 23])
@pytest.mark.parametrize("packed", [False, True])
def test_fa3_wiring_matches_the_loop(monkeypatch, window, packed):
    """masked_attention(backend="fa3") -> swa_fa3 -> FA3's calls: window w becomes left = w - 1,
    [T, B, H, D] goes in as strided views (no copy), GQA without repeated K/V, packed documents
    as int32 cu_seqlens; outputs and gradients against the float64 loop."""
    from megatron_gdn.hybrid import attention as attn_mod
    from megatron_gdn.hybrid import swa_fa3

    calls = []
    monkeypatch.setattr(swa_fa3, "_interface", lambda: _fake_fa3(calls))
    monkeypatch.setattr(attn_mod, "fa3_supported", lambda q: True)
    cu = [0, 9, 10, 31] if packed else None
    T, B, H, G, D = (31, 1, 4, 2, 8) if packed else (19, 2, 4, 2, 8)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(T, B, H, D, dtype=torch.float64, generator=gen).requires_grad_()
    k, v = (torch.randn(T, B, G, D, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    if packed:
        pos, doc = _tags(cu)
        mask = MaskSpec(pos, doc, pos, doc, window, cu_seqlens=tuple(cu))
    else:
        pos = torch.arange(T)
        doc = torch.zeros(T, dtype=torch.long)
        mask = MaskSpec(pos, doc, pos, doc, window, plain=True)
    out = masked_attention(q, k, v, mask, 0.4, backend="fa3")
    assert len(calls) == 1
    call = calls[0]
    assert call["kind"] == ("varlen" if packed else "dense")
    assert call["window_size"] == ((-1 if window is None else window - 1), 0)
    assert call["q"].data_ptr() == q.data_ptr()  # a view of the caller's tensor
    if not packed:
        assert call["q"].shape == (B, T, H, D) and call["k"].shape == (B, T, G, D)
    else:
        assert call["q"].shape == (T, H, D) and call["cu"].tolist() == cu and call["max"] == 21
    do = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ins = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = _loop_reference(*ins, cu or [0, T], window, 0.4)
    ref_grads = torch.autograd.grad(ref, ins, do)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def _hide_installed_fa3(monkeypatch):
    """No FA3 importable except what the test puts in MGDN_FA3_DIR (a build found earlier in
    this process, or installed, would otherwise answer first)."""
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if not (Path(p or ".") / "flash_attn_interface.py").exists()])
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)


def test_fa3_refuses_clearly_where_it_cannot_run(monkeypatch, tmp_path):
    from megatron_gdn.hybrid import swa_fa3

    q = torch.randn(4, 1, 2, 8)
    pos = torch.arange(4)
    doc = torch.zeros(4, dtype=torch.long)
    assert not swa_fa3.fa3_supported(q.permute(1, 2, 0, 3))  # the CPU
    with pytest.raises(ValueError, match="FlashAttention-3 build"):
        masked_attention(q, q, q, MaskSpec(pos, doc, pos, doc, 2, plain=True), 0.5, backend="fa3")
    with pytest.raises(ValueError, match="packed documents"):
        # CP-like keys: more keys than queries
        masked_attention(q[:2], q, q, MaskSpec(pos[:2], doc[:2], pos, doc, 2), 0.5, backend="fa3")
    with pytest.raises(ValueError, match="window must be >= 1"):
        swa_fa3.fa3_attention(q, q, q, 0, 0.5)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        swa_fa3.fa3_attention(torch.randn(4, 1, 3, 8), q, q, 2, 0.5)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        swa_fa3.fa3_varlen_attention(q[:, 0], q[:, 0], q[:, 0], [0, 3, 2, 4], 2, 0.5)
    # no FA3 anywhere: the reason, not an ImportError
    _hide_installed_fa3(monkeypatch)
    monkeypatch.setenv("MGDN_FA3_DIR", str(tmp_path))
    swa_fa3._interface.cache_clear()
    try:
        assert "not available" in swa_fa3.fa3_status() and str(tmp_path) in swa_fa3.fa3_status()
        with pytest.raises(RuntimeError, match="not available"):
            swa_fa3.fa3_attention(q, q, q, 2, 0.5)
    finally:
        swa_fa3._interface.cache_clear()


def test_fa3_build_folder_is_found(monkeypatch, tmp_path):
    """A build folder (what scripts/build_fa3.sh writes) named by MGDN_FA3_DIR is imported."""
    import sys

    from megatron_gdn.hybrid import swa_fa3

    (tmp_path / "flash_attn_interface.py").write_text(
        "def flash_attn_func(*a, **k):\n    return 'dense'\n"
        "def flash_attn_varlen_func(*a, **k):\n    return 'varlen'\n")
    _hide_installed_fa3(monkeypatch)
    monkeypatch.setenv("MGDN_FA3_DIR", str(tmp_path))
    swa_fa3._interface.cache_clear()
    try:
        q = torch.randn(1, 4, 2, 8)
        assert swa_fa3.fa3_attention(q, q, q, 3, 0.5) == "dense"
        assert swa_fa3.fa3_varlen_attention(q[0], q[0], q[0], [0, 4], None, 0.5) == "varlen"
        assert str(tmp_path) in swa_fa3.fa3_status()
    finally:
        sys.modules.pop("flash_attn_interface", None)
        swa_fa3._interface.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 128, 1000])
@pytest.mark.parametrize("packed", [False, True])
def test_fa3_on_gpu(window, packed):
    from megatron_gdn.hybrid.swa_fa3 import fa3_status, fa3_supported

    T, B, H, G, D = (3000, 1, 8, 2, 128) if packed else (1500, 2, 8, 2, 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, B, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(T, B, G, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    if not fa3_supported(q.permute(1, 2, 0, 3)):
        pytest.skip(f"FlashAttention-3 not usable here: {fa3_status()}")
    if packed:
        cu = [0, 700, 701, 2100, 3000]
        pos, doc = _tags(cu)
        pos, doc = pos.cuda(), doc.cuda()
        mask = MaskSpec(pos, doc, pos, doc, window, cu_seqlens=tuple(cu))
    else:
        pos = torch.arange(T, device="cuda")
        doc = torch.zeros(T, dtype=torch.long, device="cuda")
        mask = MaskSpec(pos, doc, pos, doc, window, plain=True)
    _check_against_dense_fp32(q, k, v, mask, D ** -0.5, "fa3")
