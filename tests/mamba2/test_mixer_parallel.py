"""Mamba2Mixer in real gloo processes against one process with the same global weights:
TP=2 + sequence parallel (dense and packed THD), CP=2 and CP=4 in Megatron's zigzag layout
(dense rows, packed THD per document, packed THD zigzagged as a whole pack). Output, input
gradient and every parameter gradient (TP=1 layout; CP gradients summed over the CP ranks, as
Megatron's gradient all-reduce over DP x CP does), FP32_REL.

Every rank also builds the one-process reference (TP=1, its own one-rank group) from the same
seed; the parallel mixer loads that state dict sliced for its TP rank, per section of the
fused tensors (in_proj [z, x, B, C, dt], conv [x, B, C]).
"""
import pytest
import torch

from megatron_gdn.testing.dist import megatron_parallel, run_distributed
from tolerance import FP32_REL, assert_close

HIDDEN, HEADDIM, STATE, GROUPS, SEQ, BATCH = 32, 16, 16, 2, 48, 2
D_INNER = 2 * HIDDEN
NHEADS = D_INNER // HEADDIM
SECTIONS = {
    "in_proj.weight": (D_INNER, D_INNER, GROUPS * STATE, GROUPS * STATE, NHEADS),
    "conv1d_weight": (D_INNER, GROUPS * STATE, GROUPS * STATE),
    "conv1d_bias": (D_INNER, GROUPS * STATE, GROUPS * STATE),
}
# per-document THD: every length a multiple of 2 * 4; whole pack: arbitrary lengths
CU_PER_DOC = [0, 16, 24, 48]
CU_WHOLE = [0, 5, 17, 18, 48]


def _config(tp=1, sp=False, cp=1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
        mamba_state_dim=STATE, mamba_head_dim=HEADDIM, mamba_num_groups=GROUPS,
        tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=cp,
        params_dtype=torch.float32,
    )


def _psp(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    if cu is None:
        return None
    c = torch.tensor(cu, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=c, cu_seqlens_kv=c, max_seqlen_q=48, max_seqlen_kv=48)


def _build(config, pg, seed=7):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gdn.mamba2 import get_mamba2_mixer_spec

    torch.manual_seed(seed)
    mixer = build_module(get_mamba2_mixer_spec(), config=config, layer_number=1, pg_collection=pg)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(0.5, 1.5)
    return mixer


def _slice(name, full, tp, rank):
    if tp == 1:
        return full
    if name == "out_proj.weight":
        return full.chunk(tp, dim=1)[rank]
    widths = SECTIONS.get(name)
    if widths is None:
        return full.chunk(tp, dim=0)[rank]
    return torch.cat([part.chunk(tp, dim=0)[rank] for part in full.split(widths, dim=0)])


def _inputs(cu):
    gen = torch.Generator().manual_seed(11)
    b = 1 if cu is not None else BATCH
    return torch.randn(SEQ, b, HIDDEN, generator=gen), torch.randn(SEQ, b, HIDDEN, generator=gen)


def _run(mixer, x, dout, psp):
    x = x.clone().requires_grad_()
    out, _ = mixer(x, packed_seq_params=psp)
    (out * dout).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}


def _worker(tp, sp, cp, cu, shard_cu):
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gdn.parallel import zigzag_shard

    world, me = dist.get_world_size(), dist.get_rank()
    singles = [dist.new_group([r]) for r in range(world)]
    pg1 = ProcessGroupCollection()
    pg1.tp = pg1.cp = singles[me]
    x, dout = _inputs(cu)
    with megatron_parallel(tp=tp, cp=cp):
        ref_mixer = _build(_config(), pg1)
        ref = _run(ref_mixer, x, dout, _psp(cu)) if me == 0 else None
        state = ref_mixer.state_dict()

        pg = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp_rank, cp_rank = pg.tp.rank(), pg.cp.rank()
        mixer = _build(_config(tp, sp, cp), pg, seed=99)
        with torch.no_grad():
            for name, p in mixer.named_parameters():
                p.copy_(_slice(name, state[name], tp, tp_rank))
        if cp > 1:
            x_l, dout_l = (zigzag_shard(t, 0, cp, cp_rank, shard_cu) for t in (x, dout))
        elif sp:
            x_l, dout_l = (t.chunk(tp, dim=0)[tp_rank] for t in (x, dout))
        else:
            x_l, dout_l = x, dout
        out, dx, grads = _run(mixer, x_l, dout_l, _psp(cu))
    return {"ref": ref, "out": out, "dx": dx, "grads": grads, "tp_rank": tp_rank, "cp_rank": cp_rank}


def _assemble_tp(name, shards, tp):
    if name == "out_proj.weight":
        return torch.cat(shards, dim=1)
    widths = SECTIONS.get(name)
    if widths is None:
        return torch.cat(shards, dim=0)
    per_rank = [s.split([w // tp for w in widths], dim=0) for s in shards]
    return torch.cat([torch.cat([parts[i] for parts in per_rank]) for i in range(len(widths))])


def _check(results, tp, sp, cp, shard_cu):
    from megatron_gdn.parallel import zigzag_unshard

    ref_out, ref_dx, ref_grads = results[0]["ref"]
    if cp > 1:
        by_rank = sorted(results, key=lambda r: r["cp_rank"])
        out = zigzag_unshard([r["out"] for r in by_rank], 0, shard_cu)
        dx = zigzag_unshard([r["dx"] for r in by_rank], 0, shard_cu)
        grads = {n: sum(r["grads"][n] for r in by_rank) for n in ref_grads}
    else:
        by_rank = sorted(results, key=lambda r: r["tp_rank"])
        out = torch.cat([r["out"] for r in by_rank]) if sp else by_rank[0]["out"]
        dx = torch.cat([r["dx"] for r in by_rank]) if sp else by_rank[0]["dx"]
        grads = {n: _assemble_tp(n, [r["grads"][n] for r in by_rank], tp) for n in ref_grads}
    assert_close(out, ref_out, FP32_REL, "out")
    assert_close(dx, ref_dx, FP32_REL, "dx")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, FP32_REL, f"d{name}")


CASES = [
    # (tp, sp, cp, cu of the layer, cu the test shards by)
    pytest.param(2, True, 1, None, None, id="tp2-sp-dense"),
    pytest.param(2, True, 1, CU_WHOLE, None, id="tp2-sp-thd"),
    pytest.param(1, False, 2, None, None, id="cp2-dense"),
    pytest.param(1, False, 2, CU_PER_DOC, CU_PER_DOC, id="cp2-thd-per-doc"),
    pytest.param(1, False, 4, None, None, id="cp4-dense"),
    pytest.param(1, False, 4, CU_PER_DOC, CU_PER_DOC, id="cp4-thd-per-doc"),
    pytest.param(1, False, 4, CU_WHOLE, None, id="cp4-thd-whole-pack"),
]


@pytest.mark.parametrize("tp, sp, cp, cu, shard_cu", CASES)
def test_parallel_vs_one_process(tp, sp, cp, cu, shard_cu):
    results = run_distributed(_worker, tp * cp, args=(tp, sp, cp, cu, shard_cu), timeout=240)
    _check(results, tp, sp, cp, shard_cu)
