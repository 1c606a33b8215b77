"""A pure-GDN GPTModel (megatron_gdn.specs.gdn_layer_spec) under context parallelism, in real
gloo processes, against one process with the same global weights on the full sequences.

Every rank gets its share of the batch exactly as Megatron's `get_batch_on_this_cp_rank`
hands it out: dense rows as pieces r and 2W-1-r of every row; packed THD input (batch 1,
`PackedSeqParams` with the GLOBAL cu_seqlens) per sequence. The loss is the token sum of the
cross entropy over the global token count, so the parameter gradients of the ranks summed over
the CP group (what Megatron's gradient reduction over DP x CP does) equal the reference's;
with sequence parallel the norm weights' gradients are also summed over TP (what
finalize_model_grads does for parameters marked `sequence_parallel`).

Launches: 2 processes (CP=2: dense rows, a packed batch split per document, a pack zigzagged
as a whole with documents starting inside pieces, and one the layer is told is zigzagged as a
whole) and 4 processes (CP=4 packed, with pieces
shorter than the conv halo; TP=2 x CP=2 + SP, dense and packed).
Compared: logits (zigzag shares put back in order) and every parameter gradient (FP32_REL).
"""
import pytest
import torch

from megatron_gdn.parallel import zigzag_shard, zigzag_unshard
from megatron_gdn.testing.dist import destroy_megatron, init_megatron, run_distributed
from tolerance import FP32_REL, assert_close

SEED = 4321
LAYERS, HIDDEN, FFN, VOCAB = 2, 64, 96, 128
H, HV, K, V = 2, 4, 16, 16
DENSE = (2, 32)                  # batch rows, tokens per row
PACKED = (8, 16, 8, 32)          # document lengths of one packed row (multiples of 8)
WHOLE = (5, 11, 3, 13)           # documents of a pack zigzagged as a whole (any lengths)
# a pack zigzagged as a whole whose documents all happen to be multiples of 2 * CP: the
# layout cannot be told from the lengths, the layer is told (cp_packed_layout="whole_pack")
WHOLE_EVEN = (4, 12, 8, 8)
SECTIONS = {
    "self_attention.in_proj.weight": (H * K, H * K, HV * V, HV * V, HV, HV),
    "self_attention.conv_weight": (H * K, H * K, HV * V),
}


def _config(tp=1, cp=1, sp=False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=4,
        linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=K,
        linear_value_head_dim=V, linear_conv_kernel_dim=4, normalization="RMSNorm",
        tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
    )


def _batch(packed):
    """packed: False (dense rows), True (documents split one by one) or "whole"."""
    gen = torch.Generator().manual_seed(SEED + 1)
    if packed:
        docs = {"whole": WHOLE, "whole_even": WHOLE_EVEN}.get(packed, PACKED)
        tokens = torch.randint(0, VOCAB, (1, sum(docs) + 1), generator=gen)
        cu = [0] + torch.tensor(docs).cumsum(0).tolist()
    else:
        tokens = torch.randint(0, VOCAB, (DENSE[0], DENSE[1] + 1), generator=gen)
        cu = None
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), cu


def _groups():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group(), ps.get_context_parallel_world_size(),
            ps.get_context_parallel_rank(), ps.get_context_parallel_group())


def _sections(name):
    for suffix, widths in SECTIONS.items():
        if name.endswith(suffix):
            return widths
    return None


def _to_local(name, full, param):
    tp, rank = _groups()[:2]
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    widths = _sections(name)
    if widths is None:
        return full.chunk(tp, dim=param.partition_dim)[rank]
    return torch.cat([part.chunk(tp, dim=0)[rank] for part in full.split(widths, dim=0)])


def _to_global(name, local, param):
    tp, _, group = _groups()[:3]
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.detach().clone()
    shards = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(shards, local.detach().contiguous(), group=group)
    widths = _sections(name)
    if widths is None:
        return torch.cat(shards, dim=param.partition_dim)
    per_rank = [s.split([w // tp for w in widths], dim=0) for s in shards]
    return torch.cat([torch.cat([parts[i] for parts in per_rank]) for i in range(len(widths))])


def _build(config, global_state=None, packed=False):
    from megatron.core.models.gpt import GPTModel

    from megatron_gdn.specs import gdn_layer_spec, get_gdn_layer_spec

    spec = gdn_layer_spec
    if packed == "whole_even":
        spec = get_gdn_layer_spec("local", cp_packed_layout="whole_pack")
    torch.manual_seed(SEED)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=256, position_embedding_type="none", parallel_output=True)
    if global_state is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(_to_local(name, global_state[name], param))
    return model


def _shard_cu(packed, cu):
    """The units Megatron zigzags: documents (per-document balancing) or whole rows."""
    return cu if packed is True else None


def _step(model, packed, sp):
    """One forward/backward of this rank's share; returns (local logits with the full vocab,
    global-layout parameter gradients summed over CP)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tp, _, tp_group, cp, cp_rank, cp_group = _groups()
    tokens, labels, cu = _batch(packed)
    total = labels.numel()
    tokens, labels = (zigzag_shard(x, 1, cp, cp_rank, _shard_cu(packed, cu)) for x in (tokens, labels))
    params = None
    if packed:
        cu_t = torch.tensor(cu, dtype=torch.int32)
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                                 cu_seqlens_q_padded=cu_t, cu_seqlens_kv_padded=cu_t,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
    model.zero_grad(set_to_none=True)
    logits_bsv = model(tokens, None, None, packed_seq_params=params)
    loss = vocab_parallel_cross_entropy(logits_bsv.transpose(0, 1).contiguous(), labels.t().contiguous())
    (loss.sum() / total).backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        torch.distributed.all_reduce(grad, group=cp_group)
        if sp and getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(grad, group=tp_group)
        grads[name] = _to_global(name, grad, p)
    if tp > 1:
        shards = [torch.empty_like(logits_bsv) for _ in range(tp)]
        torch.distributed.all_gather(shards, logits_bsv.detach().contiguous(), group=tp_group)
        logits_bsv = torch.cat(shards, dim=-1)
    return logits_bsv.detach(), grads


def _run(cases):
    """cases: [(name, tp, cp, sp, packed)]; returns {name: (cp_rank, tp_rank, logits, grads)}
    and the reference {packed: (logits, grads)}."""
    out = {}
    init_megatron()
    model = _build(_config())
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = {packed: _step(model, packed, False) for packed in {c[4] for c in cases}}
    destroy_megatron()
    for name, tp, cp, sp, packed in cases:
        init_megatron(tp=tp, cp=cp)
        model = _build(_config(tp=tp, cp=cp, sp=sp), state, packed)
        logits, grads = _step(model, packed, sp)
        tp_size, tp_rank, _, _, cp_rank, _ = _groups()
        out[name] = (cp_rank, tp_rank, logits, grads)
        destroy_megatron()
    out["errors"] = _layout_errors(cases[0][2])
    return out, refs


def _layout_errors(cp):
    """The messages of the layouts a CP run cannot take: an odd local length (the global one
    not divisible by 2 * CP), a pack whose documents and total are not; and of an unknown
    cp_packed_layout."""
    from megatron.core.packed_seq_params import PackedSeqParams

    init_megatron(cp=cp)
    model = _build(_config(cp=cp))
    messages = []
    cu = torch.tensor([0, 2 * cp, 7 * cp], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu)
    for tokens, params in ((torch.zeros(1, 7, dtype=torch.long), None),
                           (torch.zeros(1, 7, dtype=torch.long), packed)):
        try:
            model(tokens, None, None, packed_seq_params=params)
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gdn.specs import get_gdn_mixer_spec

    try:
        build_module(get_gdn_mixer_spec("local", cp_packed_layout="zigzag"), config=_config(cp=cp),
                     layer_number=1)
        messages.append(None)
    except ValueError as exc:
        messages.append(str(exc))
    destroy_megatron()
    return messages


CASES_2 = [("cp2_dense", 1, 2, False, False), ("cp2_packed", 1, 2, False, True),
           ("cp2_whole_pack", 1, 2, False, "whole"),
           ("cp2_whole_pack_told", 1, 2, False, "whole_even")]
CASES_4 = [("cp4_packed", 1, 4, False, True), ("tp2_cp2_sp_dense", 2, 2, True, False),
           ("tp2_cp2_sp_packed", 2, 2, True, True)]


@pytest.fixture(scope="module")
def two():
    return run_distributed(_run, world_size=2, args=(CASES_2,), timeout=600)


@pytest.fixture(scope="module")
def four():
    return run_distributed(_run, world_size=4, args=(CASES_4,), timeout=600)


def _check(results, cases):
    for name, tp, cp, sp, packed in cases:
        ref_logits, ref_grads = results[0][1][packed]
        cu = _batch(packed)[2]
        per_rank = [res[0][name] for res in results]
        parts = {cp_rank: logits for cp_rank, tp_rank, logits, _ in per_rank if tp_rank == 0}
        logits = zigzag_unshard([parts[r] for r in range(cp)], 1, _shard_cu(packed, cu))
        assert_close(logits, ref_logits, FP32_REL, f"{name} logits")
        for rank, (_, _, _, grads) in enumerate(per_rank):
            assert set(grads) == set(ref_grads)
            for pname, grad in grads.items():
                assert_close(grad, ref_grads[pname], FP32_REL, f"{name} rank {rank} grad {pname}")


def test_cp2_matches_one_process(two):
    _check(two, CASES_2)


def test_cp4_and_tp2_cp2_sp_match_one_process(four):
    _check(four, CASES_4)


def test_impossible_layouts_raise_named_errors(two):
    odd, packed, option = two[0][0]["errors"]
    assert option is not None and "cp_packed_layout='zigzag'" in option, option
    assert odd is not None and "2 * context_parallel_size = 4" in odd, odd
    assert packed is not None and "the pack has 14 tokens, not divisible by 2 *" in packed, packed


def test_reference_depends_on_context(two):
    """The comparison is not vacuous: every GDN parameter of the reference has a gradient
    (the core test guards that cutting the chain at the pieces would fail the comparison)."""
    _, ref_grads = two[0][1][True]
    for name, grad in ref_grads.items():
        if "self_attention" in name:
            assert grad.abs().sum() > 0, f"reference grad of {name} is all zero"
