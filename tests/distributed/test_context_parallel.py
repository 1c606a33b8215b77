"""Context parallelism of the GDN core (megatron_gdn.parallel) on real gloo processes.

Each CP size is one launch that runs every case in turn: the inputs of the FULL sequences are
drawn in the parent, every rank takes its zigzag share exactly as Megatron hands it to the
layers (dense rows: pieces r and 2W-1-r per row; packed THD: per sequence), runs
short conv with halo -> chunk_gated_delta_rule_cp, and returns its outputs and gradients. The
parent compares them with one process running the plain kernels on the full sequences: local
outputs and input gradients against the zigzag share of the reference, parameter gradients
(replicated over CP) summed over ranks against the reference's. fp32, torch path.

Cases: GVA with every fused option (L2-norm, gate from A_log/dt_bias, sigmoid beta) on dense
rows; plain g/beta with 6 heads (not divisible by CP=4); packed sequences split per document
whose pieces are shorter than the conv halo, with an empty sequence; a pack zigzagged as a
whole (Megatron's per-sequence balancing) with documents starting inside pieces, on a piece
boundary, shorter than the halo and spanning ranks; the Triton kernels (interpreter) on a
packed batch at CP=2. The reference always runs the torch path.
"""
import pytest
import torch

from megatron_gdn.parallel import CPLayout, zigzag_indices, zigzag_shard, zigzag_unshard
from megatron_gdn.testing.dist import run_distributed
from tolerance import FP32_REL, assert_close, rel_error

CONV_WIDTH = 4

# name: (batch, seq_lens (None: dense rows of this length), H, HV, K, V, fused)
CASES = {
    "dense-B2-T32-H2-HV4-K16-V8-fused": (2, 32, 2, 4, 16, 8, True),
    "dense-B1-T48-H6-HV6-K8-V8-plain": (1, 48, 6, 6, 8, 8, False),
    "packed-16-0-8-32-24-H2-HV2-K8-V16-fused": (1, (16, 0, 8, 32, 24), 2, 2, 8, 16, True),
    # whole-pack zigzag: documents start inside pieces, on piece boundaries (36), are shorter
    # than the conv halo (1) and span ranks
    "wholepack-5-1-13-17-4-8-H2-HV4-K8-V8-plain": (1, ("whole", 5, 1, 13, 17, 4, 8), 2, 4, 8, 8, False),
    # the Triton kernels (conv with halo states, widened chunk call) under the interpreter
    "triton-packed-8-24-H1-HV2-K16-V16-fused": (1, (8, 24), 1, 2, 16, 16, True),
    # ... and with the widened call split in two (as where V + K exceeds the Triton state tile)
    "triton-split-dense-B1-T16-H1-HV2-K16-V16-fused": (1, 16, 1, 2, 16, 16, True),
}


def _inputs(case, seed):
    batch, lens, H, HV, K, V, fused = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    lens = _doc_lens(case)
    T = lens if isinstance(lens, int) else sum(lens)
    D = 2 * H * K + HV * V

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale

    t = dict(
        x=rnd(batch, T, D),
        conv_w=rnd(D, CONV_WIDTH, scale=0.5),
        conv_b=rnd(D, scale=0.1),
        a=rnd(batch, T, HV),
        b=rnd(batch, T, HV),
        # weak decay (A in [0.02, 0.2]) so the state carried across pieces matters
        A_log=torch.log(torch.rand(HV, generator=gen) * 0.18 + 0.02),
        dt_bias=rnd(HV, scale=0.5),
        do=rnd(batch, T, HV, V),
    )
    if not fused:
        # plain log-decay and beta in (0, 1); q/k normalised so the recurrence stays bounded
        t["a"] = -torch.rand(batch, T, HV, generator=gen) * 0.05
        t["b"] = torch.rand(batch, T, HV, generator=gen)
    cu = None if isinstance(lens, int) else [0] + torch.tensor(lens).cumsum(0).tolist()
    return t, cu


def _doc_lens(case):
    lens = CASES[case][1]
    return lens[1:] if isinstance(lens, tuple) and lens[0] == "whole" else lens


def _whole_pack(case):
    lens = CASES[case][1]
    return isinstance(lens, tuple) and lens[0] == "whole"


def _core(t, case, conv, chunk):
    """conv -> split -> chunk; `conv` and `chunk` are the plain kernels or the CP versions."""
    batch, lens, H, HV, K, V, fused = CASES[case]
    y = conv(t["x"], t["conv_w"], t["conv_b"])
    B, T = y.shape[:2]
    q, k, v = torch.split(y, [H * K, H * K, HV * V], dim=-1)
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V)
    if fused:
        return chunk(q, k, v, t["a"], t["b"], use_qk_l2norm=True, A_log=t["A_log"],
                     dt_bias=t["dt_bias"], use_beta_sigmoid=True)
    q = torch.nn.functional.normalize(q, dim=-1)
    k = torch.nn.functional.normalize(k, dim=-1)
    return chunk(q, k, v, t["a"], t["b"])


GRAD_NAMES = ("x", "conv_w", "conv_b", "a", "b", "A_log", "dt_bias")
SEQ_KEYS = ("x", "a", "b", "do")


def _grad_names(case):
    """Inputs with a gradient: the plain case has no A_log / dt_bias in its graph."""
    return GRAD_NAMES if CASES[case][-1] else GRAD_NAMES[:5]


def _leaf(t):
    return {n: (x.clone().requires_grad_(True) if n in GRAD_NAMES else x) for n, x in t.items()}


def _piece_cu(case, cp_size):
    """Global boundaries of every zigzag piece: the run that passes nothing between pieces."""
    batch = CASES[case][0]
    lens = _doc_lens(case)
    lens = [lens] * batch if isinstance(lens, int) else lens
    if _whole_pack(case):
        total = sum(lens)
        docs = torch.tensor([0] + list(lens)).cumsum(0).tolist()
        pieces = [i * total // (2 * cp_size) for i in range(2 * cp_size + 1)]
        return sorted(set(docs) | set(pieces))
    cu = [0]
    for length in lens:
        base = cu[-1]
        cu += [base + (i + 1) * length // (2 * cp_size) for i in range(2 * cp_size)]
    return cu


def _reference(case, seed, cut_pieces=0):
    """The full sequences in one process; with cut_pieces=W every zigzag piece of W ranks is
    its own sequence instead (what a CP run without halo and state passing would give)."""
    from megatron_gdn.kernels.conv1d import causal_conv1d
    from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule

    t, cu = _inputs(case, seed)
    leaves = _leaf(t)
    cu_t = None if cu is None else torch.tensor(cu)
    batch = t["x"].shape[0]
    t = leaves
    if cut_pieces:
        cu_t = torch.tensor(_piece_cu(case, cut_pieces))
        t = {n: (x.reshape(1, -1, *x.shape[2:]) if n in SEQ_KEYS else x) for n, x in leaves.items()}

    def conv(x, w, b):
        return causal_conv1d(x, w, b, activation="silu", cu_seqlens=cu_t)[0]

    def chunk(*args, **kw):
        return chunk_gated_delta_rule(*args, cu_seqlens=cu_t, **kw)[0]

    o = _core(t, case, conv, chunk)
    (o * t["do"]).sum().backward()
    grads = {n: leaves[n].grad for n in _grad_names(case)}
    return o.detach().reshape(batch, -1, *o.shape[2:]), grads, cu


def _cp_rank(cases, seed):
    import torch.distributed as dist

    from unittest import mock

    import megatron_gdn.parallel.context_parallel as cp_module
    from megatron_gdn.kernels.utils import force_backend
    from megatron_gdn.parallel import chunk_gated_delta_rule_cp, conv_with_cp_halo

    group = dist.new_group(list(range(dist.get_world_size())))
    W, r = dist.get_world_size(), dist.get_rank()
    results = {}
    for case in cases:
        full, cu = _inputs(case, seed)
        shard_cu = None if _whole_pack(case) else cu
        local = {n: (zigzag_shard(x, 1, W, r, shard_cu) if n in SEQ_KEYS else x) for n, x in full.items()}
        if cu is None:
            layout = CPLayout.dense(local["x"].shape[0], local["x"].shape[1], W, r)
        else:
            mode = "whole_pack" if _whole_pack(case) else "per_document"
            layout = CPLayout.packed(torch.tensor(cu), local["x"].shape[1], W, r, mode)
        t = _leaf(local)

        def conv(x, w, b):
            return conv_with_cp_halo(x, w, b, "silu", layout, group)

        def chunk(*args, **kw):
            return chunk_gated_delta_rule_cp(*args, layout=layout, group=group, **kw)

        state_tile = 16 if "-split-" in case else cp_module.MAX_V_TRITON
        with force_backend("triton" if case.startswith("triton-") else "torch"), \
                mock.patch.object(cp_module, "MAX_V_TRITON", state_tile):
            o = _core(t, case, conv, chunk)
            (o * t["do"]).sum().backward()
        results[case] = (o.detach(), {n: t[n].grad for n in _grad_names(case)})
    return results


def _check(cp_size, cases):
    seed = 7
    per_rank = run_distributed(_cp_rank, world_size=cp_size, args=(cases, seed),
                               enable_cpu=False, timeout=240)
    for case in cases:
        o_ref, g_ref, cu = _reference(case, seed)
        shard_cu = None if _whole_pack(case) else cu
        # the check can fail: cutting the chain at the pieces changes the result by far more
        o_cut, g_cut, _ = _reference(case, seed, cut_pieces=cp_size)
        for name, cut, ref in (("o", o_cut, o_ref), ("dx", g_cut["x"], g_ref["x"])):
            assert rel_error(cut, ref) > 1e3 * FP32_REL, f"{case}: {name} barely depends on passing"
        o = zigzag_unshard([res[case][0] for res in per_rank], 1, shard_cu)
        assert_close(o, o_ref, FP32_REL, f"CP={cp_size} {case} o")
        for n in _grad_names(case):
            parts = [res[case][1][n] for res in per_rank]
            if n in SEQ_KEYS:
                got = zigzag_unshard(parts, 1, shard_cu)
            else:
                got = torch.stack(parts).sum(0)
            assert_close(got, g_ref[n], FP32_REL, f"CP={cp_size} {case} d{n}")


@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_core_matches_full_sequence(cp_size):
    # the interpreted Triton case once (CP=2): it is slow
    _check(cp_size, [c for c in CASES if cp_size == 2 or not c.startswith("triton-")])


def test_zigzag_indices_match_megatron_layout():
    # packed: per sequence, pieces r and 2W-1-r (Transformer Engine's thd_get_partitioned_indices)
    cu = [0, 8, 12]
    assert zigzag_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert zigzag_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    # dense: Megatron's own per-sequence split of a [b, s] batch
    from megatron.core.utils import _get_batch_on_this_cp_rank_per_sequence_balancing
    from unittest import mock

    tokens = torch.arange(2 * 24).reshape(2, 24)
    for W in (2, 3, 4):
        parts = []
        for r in range(W):
            with mock.patch("torch.distributed.get_world_size", return_value=W), \
                    mock.patch("torch.distributed.get_rank", return_value=r):
                batch = _get_batch_on_this_cp_rank_per_sequence_balancing(
                    {"tokens": tokens.clone()}, cp_group=None)
            assert torch.equal(batch["tokens"], zigzag_shard(tokens, 1, W, r)), (W, r)
            parts.append(batch["tokens"])
        assert torch.equal(zigzag_unshard(parts, 1), tokens)


def test_layout_errors():
    with pytest.raises(ValueError, match="must be even"):
        CPLayout.dense(1, 7, 2, 0)
    with pytest.raises(ValueError, match="not divisible by 2 \\* context_parallel_size"):
        CPLayout.packed([0, 8, 14], 7, 2, 0)
    with pytest.raises(ValueError, match="global \\(padded\\) cu_seqlens"):
        CPLayout.packed([0, 8, 16], 16, 2, 0)
    with pytest.raises(ValueError, match="cp_rank=2"):
        CPLayout.dense(1, 8, 2, 2)
    with pytest.raises(ValueError, match="packed sequence 1 has \\(padded\\) length 6"):
        CPLayout.packed([0, 8, 14, 16], 8, 2, 0, "per_document")
    with pytest.raises(ValueError, match="packed layout 'zigzag'"):
        CPLayout.packed([0, 8, 16], 8, 2, 0, "zigzag")
    layout = CPLayout.packed([0, 8, 16, 16, 32], 16, 2, 1)
    assert layout.local_cu == [0, 2, 4, 6, 8, 8, 8, 12, 16]
    # a whole pack of 16 at W=2 (pieces of 4): rank 1 holds pieces 1 and 2, [4, 12) of the
    # pack; documents start at 0, 6, 8 and 9: piece 1 is cut at 6, piece 2 at 9
    layout = CPLayout.packed([0, 6, 8, 9, 16], 8, 2, 1)
    assert layout.unit_lens == (16,) and layout.doc_starts == ((0, 6, 8, 9),)
    subs = [(x.start, x.end, x.local_piece, x.pos, x.doc_start, x.continues) for x in layout.sub_segments]
    assert subs == [(0, 2, 0, 4, 0, True), (2, 4, 0, 6, 6, False),
                    (4, 5, 1, 8, 8, False), (5, 8, 1, 9, 9, False)]
