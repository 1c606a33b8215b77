"""A GPTModel built with megatron_gdn.specs.gdn_layer_spec, in real gloo processes, against one
process with the same global weights: TP=2, TP=2 + sequence parallel (both also with packed
THD documents), PP=2 (1F1B schedule),
DP=2 (Megatron's DDP), distributed checkpoints TP=2 -> TP=1 and TP=1 -> TP=4.

Every configuration trains one step through `get_forward_backward_func` (finalize_model_grads
included) and returns the loss, the full logits and every parameter gradient in the TP=1
layout to the parent, which compares them with the reference (FP32_REL).

Same global weights: GDN's fused in_proj holds [q_r | k_r | v_r | z_r | b_r | a_r] on rank r
(and its conv [q_r | k_r | v_r]), so the TP=1 layout is recovered per section; the reference
state dict is sliced into every sharded model that way (test-side code, independent of the
layer's sharded_state_dict, which the checkpoint cases exercise).

Ablated layers (use_output_gate / use_short_conv / use_decay all False: in_proj [q|k|v|b], no
conv, A_log or dt_bias): TP=2, TP=2 + SP with packed documents and a TP=2 -> TP=1 checkpoint.

Launches: one of 2 processes (TP, SP, PP, DP, TP=2 -> TP=1), one of 4 (TP=1 -> TP=4) and one of
2 (the ablated layer).
"""
import pytest
import torch

from megatron_gdn.testing.dist import destroy_megatron, init_megatron, run_distributed
from tolerance import FP32_REL, assert_close

SEED = 1234
LAYERS, HIDDEN, FFN, VOCAB, SEQ, BATCH = 2, 64, 128, 128, 32, 4
H, HV, K, V = 4, 8, 16, 16
MICRO_BATCHES = 2
# global (TP=1) section widths of the fused GDN tensors, split along dim 0
SECTIONS = {
    "self_attention.in_proj.weight": (H * K, H * K, HV * V, HV * V, HV, HV),
    "self_attention.conv_weight": (H * K, H * K, HV * V),
}
# the same with every ablation option off: no z, no a rows, no conv
ABLATED = dict(use_output_gate=False, use_short_conv=False, use_decay=False)
ABLATED_SECTIONS = {"self_attention.in_proj.weight": (H * K, H * K, HV * V, HV)}


def _sections(name, sections=None):
    for suffix, widths in (sections or SECTIONS).items():
        if name.endswith(suffix):
            return widths
    return None


def _config(tp=1, pp=1, sp=False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=4,
        linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=K,
        linear_value_head_dim=V, linear_conv_kernel_dim=4, normalization="RMSNorm",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
    )


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_group())


def _layer_offset():
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // pp)


def _global_name(name):
    """Stage-local parameter name -> name in the PP=1 model."""
    if name.startswith("decoder.layers."):
        index, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(index) + _layer_offset()}.{rest}"
    return name


def _to_local(name, full, param, sections=None):
    """Slice a global (TP=1 layout) tensor for this TP rank."""
    tp, rank, _ = _tp()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    widths = _sections(name, sections)
    if widths is None:
        return full.chunk(tp, dim=param.partition_dim)[rank]
    return torch.cat([part.chunk(tp, dim=0)[rank] for part in full.split(widths, dim=0)])


def _to_global(name, local, param, sections=None):
    """Gather the TP shards of a parameter (or its grad) into the TP=1 layout."""
    tp, _, group = _tp()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.detach().clone()
    shards = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(shards, local.detach().contiguous(), group=group)
    widths = _sections(name, sections)
    if widths is None:
        return torch.cat(shards, dim=param.partition_dim)
    local_widths = [w // tp for w in widths]
    per_rank = [s.split(local_widths, dim=0) for s in shards]
    return torch.cat([torch.cat([parts[i] for parts in per_rank]) for i in range(len(widths))])


def _build(config, seed=SEED, global_state=None, gdn_params=None):
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel

    from megatron_gdn.specs import gdn_layer_spec, get_gdn_layer_spec

    spec = gdn_layer_spec if gdn_params is None else get_gdn_layer_spec("local", **gdn_params)
    sections = None if gdn_params is None else ABLATED_SECTIONS
    torch.manual_seed(seed)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
        max_sequence_length=SEQ, parallel_output=True,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if global_state is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(_to_local(name, global_state[_global_name(name)], param, sections))
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    # the section widths of this model's fused GDN tensors (test-side layout knowledge)
    ddp.gdn_sections = sections
    return ddp


def _global_params(model):
    return {_global_name(n): _to_global(n, p, p, model.gdn_sections) for n, p in model.module.named_parameters()}


def _batch():
    gen = torch.Generator().manual_seed(SEED + 1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _gather_vocab(logits):
    tp, _, group = _tp()
    if tp == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def _packed_params():
    """Every row holds documents of lengths 5, 12 and 15 (THD, one row per micro-batch)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, 5, 17, SEQ], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=15, max_seqlen_kv=15)


def _train_step(model, tokens, labels, packed=False):
    """One forward/backward through Megatron's schedule: (loss, logits, global grads) of the
    stage this rank holds (loss and logits on the last stage only). packed: micro-batches of
    one row each, passed as packed documents."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    micro = tokens.shape[0] // MICRO_BATCHES
    if packed:
        tokens, labels = tokens[:MICRO_BATCHES], labels[:MICRO_BATCHES]
        micro = 1
    data = iter([(tokens[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro])
                 for i in range(MICRO_BATCHES)])
    logits_out = []

    def forward_step(data_iterator, module):
        tok, lab = next(data_iterator)
        position_ids = torch.arange(SEQ).unsqueeze(0).expand_as(tok)
        output = module(tok, position_ids, None, packed_seq_params=_packed_params() if packed else None)

        def loss_func(logits_bsv):
            logits_out.append(logits_bsv.detach())
            loss = vocab_parallel_cross_entropy(logits_bsv.transpose(0, 1).contiguous(), lab.t().contiguous())
            loss = loss.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model],
        num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=micro, forward_only=False,
    )
    grads = {_global_name(n): _to_global(n, p.main_grad, p, model.gdn_sections)
             for n, p in model.module.named_parameters()}
    loss = logits = None
    if parallel_state.is_pipeline_last_stage():
        loss = torch.stack([item["loss"] for item in losses]).mean()
        logits = _gather_vocab(torch.cat(logits_out, dim=0))
    return loss, logits, grads


def _save(model, ckpt_dir):
    import multiprocessing

    from megatron.core import dist_checkpointing

    # the harness starts ranks as daemonic processes, and Megatron's torch_dist writer starts a
    # multiprocessing Manager (a child process), which daemonic processes may not do
    multiprocessing.current_process().daemon = False
    dist_checkpointing.save(model.module.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()


def _load(model, ckpt_dir):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.module.sharded_state_dict(), ckpt_dir)
    model.module.load_state_dict(state)


def _two_ranks(ckpt_dir):
    """Runs on each of 2 ranks; returns {case: ...} (rank-local view)."""
    from megatron.core import parallel_state

    tokens, labels = _batch()
    out = {}

    # reference: TP=1, PP=1, every rank the full batch (DP=2 averages identical grads)
    init_megatron(tp=1)
    model = _build(_config())
    ref_state = _global_params(model)
    out["ref_state"] = ref_state
    out["ref"] = _train_step(model, tokens, labels)
    out["ref_packed"] = _train_step(model, tokens, labels, packed=True)
    destroy_megatron()

    for case, sp in (("tp2", False), ("tp2_sp", True)):
        init_megatron(tp=2)
        model = _build(_config(tp=2, sp=sp), seed=SEED + 7, global_state=ref_state)
        out[case] = _train_step(model, tokens, labels)
        out[case + "_packed"] = _train_step(model, tokens, labels, packed=True)
        if case == "tp2":
            _save(model, ckpt_dir)
            # GDN parameters draw all heads and keep this rank's rows (in_proj by sections):
            # TP-independent init
            fresh = _global_params(_build(_config(tp=2)))
            out["tp2_init"] = {n: t for n, t in fresh.items()
                               if n.split(".")[-1] in ("conv_weight", "A_log", "dt_bias", "out_norm_weight")
                               or n.endswith("self_attention.in_proj.weight")}
        destroy_megatron()

    init_megatron(pp=2)
    model = _build(_config(pp=2), seed=SEED + 7, global_state=ref_state)
    out["pp2"] = _train_step(model, tokens, labels)
    destroy_megatron()

    # DP=2: each rank half of the batch; DDP averages the grads
    init_megatron(tp=1, dp=2)
    rank = parallel_state.get_data_parallel_rank()
    half = BATCH // 2
    model = _build(_config())
    out["dp2"] = _train_step(model, tokens[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
    destroy_megatron()

    # the TP=2 checkpoint into a TP=1 model built from another seed
    init_megatron(tp=1)
    model = _build(_config(), seed=SEED + 11)
    _load(model, ckpt_dir)
    out["ckpt_tp2_to_tp1_state"] = _global_params(model)
    out["ckpt_tp2_to_tp1"] = _train_step(model, tokens, labels)
    destroy_megatron()
    return out


def _two_ranks_ablated(ckpt_dir):
    """The ablated layer (ABLATED): TP=1 reference, TP=2, TP=2 + SP on packed documents, and
    the TP=2 checkpoint (sections q, k, v, b only) loaded into TP=1."""
    tokens, labels = _batch()
    out = {}
    init_megatron(tp=1)
    model = _build(_config(), gdn_params=ABLATED)
    ref_state = _global_params(model)
    out["ref_state"] = ref_state
    out["ref"] = _train_step(model, tokens, labels)
    out["ref_packed"] = _train_step(model, tokens, labels, packed=True)
    destroy_megatron()

    init_megatron(tp=2)
    model = _build(_config(tp=2), seed=SEED + 7, global_state=ref_state, gdn_params=ABLATED)
    out["tp2"] = _train_step(model, tokens, labels)
    _save(model, ckpt_dir)
    from megatron.core.dist_checkpointing import load_tensors_metadata

    out["ckpt_keys"] = sorted(k for k in load_tensors_metadata(ckpt_dir) if "self_attention" in k)
    destroy_megatron()

    init_megatron(tp=2)
    model = _build(_config(tp=2, sp=True), seed=SEED + 7, global_state=ref_state, gdn_params=ABLATED)
    out["tp2_sp_packed"] = _train_step(model, tokens, labels, packed=True)
    destroy_megatron()

    init_megatron(tp=1)
    model = _build(_config(), seed=SEED + 11, gdn_params=ABLATED)
    _load(model, ckpt_dir)
    out["ckpt_tp2_to_tp1_state"] = _global_params(model)
    out["ckpt_tp2_to_tp1"] = _train_step(model, tokens, labels)
    destroy_megatron()
    return out


def _four_ranks(ckpt_dir):
    """TP=1 saves, TP=4 loads (into a model built from another seed) and trains one step."""
    tokens, labels = _batch()
    out = {}
    init_megatron(tp=1)
    model = _build(_config())
    out["ref_state"] = _global_params(model)
    out["ref"] = _train_step(model, tokens, labels)
    _save(model, ckpt_dir)
    destroy_megatron()

    init_megatron(tp=4)
    model = _build(_config(tp=4), seed=SEED + 11)
    _load(model, ckpt_dir)
    out["tp4_state"] = _global_params(model)
    out["tp4"] = _train_step(model, tokens, labels)
    destroy_megatron()
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_distributed(_two_ranks, world_size=2, args=(str(tmp_path_factory.mktemp("ckpt_tp2")),),
                           timeout=600)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_distributed(_four_ranks, world_size=4, args=(str(tmp_path_factory.mktemp("ckpt_tp1")),),
                           timeout=600)


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    return run_distributed(_two_ranks_ablated, world_size=2,
                           args=(str(tmp_path_factory.mktemp("ckpt_ablated")),), timeout=600)


def _check_run(run, ref, label, compare_outputs=True):
    ref_loss, ref_logits, ref_grads = ref
    loss, logits, grads = run
    if compare_outputs and loss is not None:
        assert_close(loss, ref_loss, FP32_REL, f"{label} loss")
    if compare_outputs and logits is not None:
        assert_close(logits, ref_logits, FP32_REL, f"{label} logits")
    assert grads, f"{label}: no gradients"
    for name, grad in grads.items():
        assert name in ref_grads, f"{label}: unexpected parameter {name}"
        assert_close(grad, ref_grads[name], FP32_REL, f"{label} grad {name}")


def _norm_weights(names):
    return [n for n in names if n.endswith("out_norm_weight") or "layernorm" in n]


@pytest.mark.parametrize("case", ["tp2", "tp2_sp", "tp2_packed", "tp2_sp_packed"])
def test_tensor_parallel_matches_one_process(two, case):
    ref = two[0]["ref_packed" if case.endswith("packed") else "ref"]
    for rank in range(2):
        _check_run(two[rank][case], ref, f"{case} rank {rank}")
        assert set(two[rank][case][2]) == set(ref[2])
    # the replicated norm weights (GDN's gated norm, the layer norms) are among those compared
    assert len(_norm_weights(ref[2])) == 3 * LAYERS + 1


def test_pipeline_parallel_matches_one_process(two):
    ref = two[0]["ref"]
    first, last = two[0]["pp2"], two[1]["pp2"]
    assert first[0] is None and last[0] is not None
    assert set(first[2]) | set(last[2]) == set(ref[2])
    _check_run(first, ref, "pp2 stage 0")
    _check_run(last, ref, "pp2 stage 1")


def test_data_parallel_ddp_matches_full_batch(two):
    ref_loss, _, ref_grads = two[0]["ref"]
    losses = [two[rank]["dp2"][0] for rank in range(2)]
    assert_close(sum(losses) / 2, ref_loss, FP32_REL, "dp2 mean loss")
    for rank in range(2):
        _check_run(two[rank]["dp2"], two[0]["ref"], f"dp2 rank {rank}", compare_outputs=False)


def test_checkpoint_tp2_to_tp1(two):
    ref_state = two[0]["ref_state"]
    loaded = two[0]["ckpt_tp2_to_tp1_state"]
    assert set(loaded) == set(ref_state)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, ref_state[name]), f"loaded {name} differs from the saved weights"
    _check_run(two[0]["ckpt_tp2_to_tp1"], two[0]["ref"], "tp2->tp1")


def test_checkpoint_tp1_to_tp4(four):
    ref_state = four[0]["ref_state"]
    for rank in range(4):
        loaded = four[rank]["tp4_state"]
        assert set(loaded) == set(ref_state)
        for name, tensor in loaded.items():
            assert torch.equal(tensor, ref_state[name]), f"rank {rank}: loaded {name} differs"
        _check_run(four[rank]["tp4"], four[0]["ref"], f"tp1->tp4 rank {rank}")


def test_per_head_init_is_tp_independent(two):
    ref_state = two[0]["ref_state"]
    fresh = two[0]["tp2_init"]
    assert len(fresh) == 5 * LAYERS
    for name, tensor in fresh.items():
        assert torch.equal(tensor, ref_state[name]), f"{name}: TP=2 init differs from TP=1 init"


def test_reference_is_not_trivial(two):
    ref_loss, _, ref_grads = two[0]["ref"]
    assert 3.0 < ref_loss.item() < 7.0  # ~ln(128) for random weights
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, f"reference grad of {name} is all zero"
    # packing changes the result: the documents really are cut apart
    packed_logits = two[0]["ref_packed"][1]
    dense_logits = two[0]["ref"][1]
    assert (packed_logits[0, 5:] - dense_logits[0, 5:]).abs().max() > 1e-3


def test_ablated_layer_tensor_parallel_and_checkpoint(ablated):
    """Every GDN ablation off: TP=2 (and TP=2 + SP, packed) equal one process, the checkpoint
    holds in_proj sections q, k, v, b only (no z, a, conv, A_log, dt_bias) and loads into TP=1."""
    for case, ref in (("tp2", "ref"), ("tp2_sp_packed", "ref_packed")):
        for rank in range(2):
            _check_run(ablated[rank][case], ablated[0][ref], f"ablated {case} rank {rank}")
            assert set(ablated[rank][case][2]) == set(ablated[0][ref][2])
    ref_state = ablated[0]["ref_state"]
    assert not [n for n in ref_state if n.split(".")[-1] in ("conv_weight", "conv_bias", "A_log", "dt_bias")]
    keys = ablated[0]["ckpt_keys"]
    assert {k.rsplit(".", 1)[-1] for k in keys if ".in_proj.weight." in k} == {"q", "k", "v", "b"}, keys
    assert not [k for k in keys if k.endswith((".z", ".a", "conv_weight", "A_log", "dt_bias"))], keys
    loaded = ablated[0]["ckpt_tp2_to_tp1_state"]
    assert set(loaded) == set(ref_state)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, ref_state[name]), f"loaded {name} differs from the saved weights"
    _check_run(ablated[0]["ckpt_tp2_to_tp1"], ablated[0]["ref"], "ablated tp2->tp1")
