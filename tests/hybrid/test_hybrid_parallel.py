"""Hybrid GPTModels from the tiny YAML presets in real gloo processes against one process with
the same global weights: outputs (logits, loss) and every parameter gradient (FP32_REL).

- tiny_gdn_h1 (GDN + SWA, MLP) and tiny_qwen3_next (GDN + gated attention with q/k norm and
  partial RoPE, MoE): TP=2 + SP (dense rows and packed THD documents) and PP=2 (1F1B over two
  micro-batches), through Megatron's schedule, DDP and finalize_model_grads.
- Context parallel, CP=2, zigzag layout (dense rows and packed THD): a stack of full attention
  and SWA layers with MLPs, and the tiny H1, Qwen3-Next-style and H2 presets (GDN and Mamba2
  layers passing states between the ranks, attention gathering K/V, SWA its halo).

Same global weights: the TP=1 state dict is sliced into every sharded model. Megatron's fused
QKV is laid out per key/value group, so TP slices it as one block; SwiGLU's fc1 holds
[gate | up] per rank and GDN's in_proj / conv hold their sections per rank: those are sliced
section by section.
"""
import pytest
import torch

from megatron_gdn.parallel import zigzag_shard, zigzag_unshard
from megatron_gdn.testing.dist import destroy_megatron, init_megatron, run_distributed
from tolerance import FP32_REL, assert_close

SEED = 2024
BATCH, MICRO_BATCHES = 4, 2
PACKED_CU = [0, 4, 12, 32]          # packed documents of one row (multiples of 2 * CP)
CONFIGS = "examples/configs"
ATTENTION_ONLY = {
    "model": {"hidden_size": 64, "vocab_size": 128, "seq_length": 32, "rope_fraction": 0.5},
    "layers": "[attention, mlp, swa, mlp, swa, mlp]",
    "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
    "swa": {"window": 11},
    "mlp": {"ffn_hidden_size": 96},
}


def _load(name):
    from megatron_gdn.hybrid import yaml_loader as yl

    if isinstance(name, dict):
        return yl.parse(name, "attention_only.yaml")
    return yl.load(f"{CONFIGS}/{name}.yaml")


def _sections(hm, name):
    g = hm.sections["gdn"]
    if name.endswith("self_attention.in_proj.weight"):
        qk, v, hv = g["num_key_heads"] * g["key_head_dim"], g["num_value_heads"] * g["value_head_dim"], g["num_value_heads"]
        return (qk, qk, v, v, hv, hv)
    if name.endswith("self_attention.conv_weight"):
        qk, v = g["num_key_heads"] * g["key_head_dim"], g["num_value_heads"] * g["value_head_dim"]
        return (qk, qk, v)
    return None


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_group())


def _widths(hm, name, full):
    widths = _sections(hm, name)
    if widths is None and name.endswith("linear_fc1.weight"):
        widths = (full.shape[0] // 2, full.shape[0] // 2)
    return widths


def _to_local(hm, name, full, param):
    tp, rank, _ = _tp()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    widths = _widths(hm, name, full)
    if widths is None:
        return full.chunk(tp, dim=param.partition_dim)[rank]
    return torch.cat([part.chunk(tp, dim=0)[rank] for part in full.split(widths, dim=0)])


def _to_global(hm, name, local, param):
    tp, _, group = _tp()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.detach().clone()
    shards = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(shards, local.detach().contiguous(), group=group)
    full_rows = local.shape[0] * tp
    widths = _widths(hm, name, torch.empty(full_rows))
    if widths is None:
        return torch.cat(shards, dim=param.partition_dim)
    per_rank = [s.split([w // tp for w in widths], dim=0) for s in shards]
    return torch.cat([torch.cat([parts[i] for parts in per_rank]) for i in range(len(widths))])


def _global_name(hm, name, config):
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if name.startswith("decoder.layers."):
        index, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(index) + get_transformer_layer_offset(config)}.{rest}"
    return name


def _build(hm, state=None, ddp=True, **overrides):
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    from megatron_gdn.hybrid import yaml_loader as yl

    config = yl.transformer_config(hm, use_cpu_initialization=True, pipeline_dtype=torch.float32,
                                   **overrides)
    torch.manual_seed(SEED)
    model = yl.build_gpt_model(hm, config)
    if state is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(_to_local(hm, name, state[_global_name(hm, name, config)], param))
    if not ddp:
        return model, config
    config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config, DistributedDataParallelConfig(), model), config


def _batch(hm):
    gen = torch.Generator().manual_seed(SEED + 1)
    seq = hm.model["seq_length"]
    tokens = torch.randint(0, hm.model["vocab_size"], (BATCH, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _packed_params(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_t = torch.tensor(cu, dtype=torch.int32)
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                           cu_seqlens_q_padded=cu_t, cu_seqlens_kv_padded=cu_t,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _gather_vocab(logits):
    tp, _, group = _tp()
    if tp == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def _train_step(hm, model, config, tokens, labels, packed=False):
    """One forward/backward through Megatron's schedule; (loss, logits, global grads)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    seq = tokens.shape[1]
    micro = tokens.shape[0] // MICRO_BATCHES
    if packed:
        tokens, labels, micro = tokens[:MICRO_BATCHES], labels[:MICRO_BATCHES], 1
    data = iter([(tokens[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro])
                 for i in range(MICRO_BATCHES)])
    logits_out = []

    def forward_step(data_iterator, module):
        tok, lab = next(data_iterator)
        position_ids = torch.arange(seq).unsqueeze(0).expand_as(tok)
        psp = _packed_params(PACKED_CU) if packed else None
        output = module(tok, position_ids, None, packed_seq_params=psp)

        def loss_func(logits_bsv):
            logits_out.append(logits_bsv.detach())
            loss = vocab_parallel_cross_entropy(logits_bsv.transpose(0, 1).contiguous(), lab.t().contiguous())
            loss = loss.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model],
        num_microbatches=MICRO_BATCHES, seq_length=seq, micro_batch_size=micro, forward_only=False,
    )
    grads = {_global_name(hm, n, config): _to_global(hm, n, p.main_grad, p)
             for n, p in model.module.named_parameters()}
    loss = logits = None
    if parallel_state.is_pipeline_last_stage():
        loss = torch.stack([item["loss"] for item in losses]).mean()
        logits = _gather_vocab(torch.cat(logits_out, dim=0))
    return loss, logits, grads


def _tp_pp_worker(names):
    out = {}
    for name in names:
        hm = _load(name)
        tokens, labels = _batch(hm)
        init_megatron(tp=1)
        model, config = _build(hm)
        state = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        out[(name, "ref")] = _train_step(hm, model, config, tokens, labels)
        out[(name, "ref_packed")] = _train_step(hm, model, config, tokens, labels, packed=True)
        destroy_megatron()

        init_megatron(tp=2)
        model, config = _build(hm, state, tensor_model_parallel_size=2, sequence_parallel=True)
        out[(name, "tp2_sp")] = _train_step(hm, model, config, tokens, labels)
        out[(name, "tp2_sp_packed")] = _train_step(hm, model, config, tokens, labels, packed=True)
        destroy_megatron()

        init_megatron(pp=2)
        model, config = _build(hm, state, pipeline_model_parallel_size=2)
        out[(name, "pp2")] = _train_step(hm, model, config, tokens, labels)
        destroy_megatron()
    return out


def _compare(results, name, case, ref):
    ref_loss, ref_logits, ref_grads = results[0][(name, ref)]
    merged = {}
    loss = logits = None
    for rank_out in results:
        r_loss, r_logits, r_grads = rank_out[(name, case)]
        merged.update(r_grads)
        if r_loss is not None:
            loss, logits = r_loss, r_logits
    assert_close(loss, ref_loss, FP32_REL, f"{name} {case} loss")
    assert_close(logits, ref_logits, FP32_REL, f"{name} {case} logits")
    assert set(merged) == set(ref_grads), sorted(set(merged) ^ set(ref_grads))
    for key, grad in ref_grads.items():
        assert_close(merged[key], grad, FP32_REL, f"{name} {case} grad {key}")


def test_tp_sp_and_pp():
    names = ("tiny_gdn_h1", "tiny_qwen3_next")
    results = run_distributed(_tp_pp_worker, world_size=2, args=(names,), timeout=600)
    for name in names:
        _compare(results, name, "tp2_sp", "ref")
        _compare(results, name, "tp2_sp_packed", "ref_packed")
        _compare(results, name, "pp2", "ref")


# --------------------------------------------------------------------------- context parallel
def _cp_step(hm, model, tokens, labels, cu, cp):
    """Forward/backward of one batch on this CP rank; the loss is the cross-entropy token sum
    over the global token count, so summing the ranks' grads over CP gives the full gradient.
    Returns (global logits (this rank's share scattered into place, zeros elsewhere), grads)."""
    from megatron.core import parallel_state

    rank = parallel_state.get_context_parallel_rank() if cp > 1 else 0
    B, S = tokens.shape
    if cu is not None:
        tokens, labels = tokens[:1], labels[:1]
    position_ids = torch.arange(S).unsqueeze(0).expand_as(tokens)
    local = [zigzag_shard(x, 1, cp, rank, cu) for x in (tokens, labels, position_ids)]
    model.zero_grad()
    psp = _packed_params(cu) if cu is not None else None
    logits = model(local[0], local[2], None, packed_seq_params=psp)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             local[1].reshape(-1), reduction="sum")
    (loss / labels.numel()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if cp > 1:
        group = parallel_state.get_context_parallel_group()
        for g in grads.values():
            torch.distributed.all_reduce(g, group=group)
    return logits.detach(), grads


def _cp_worker(spec):
    hm = _load(spec)
    tokens, labels = _batch(hm)
    out = {}
    init_megatron(tp=1)
    model, _ = _build(hm, ddp=False)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for label, cu in (("dense", None), ("packed", PACKED_CU)):
        out[("ref", label)] = _cp_step(hm, model, tokens, labels, cu, 1)
    destroy_megatron()
    init_megatron(cp=2)
    model, _ = _build(hm, state, ddp=False, context_parallel_size=2)
    for label, cu in (("dense", None), ("packed", PACKED_CU)):
        out[("cp2", label)] = _cp_step(hm, model, tokens, labels, cu, 2)
    destroy_megatron()
    return out


def _check_cp(results):
    for label, cu in (("dense", None), ("packed", PACKED_CU)):
        ref_logits, ref_grads = results[0][("ref", label)]
        logits = zigzag_unshard([r[("cp2", label)][0] for r in results], 1, cu)
        assert_close(logits, ref_logits, FP32_REL, f"cp2 {label} logits")
        for rank, r in enumerate(results):
            grads = r[("cp2", label)][1]
            assert set(grads) == set(ref_grads)
            for key, grad in ref_grads.items():
                assert_close(grads[key], grad, FP32_REL, f"cp2 {label} rank {rank} grad {key}")


def test_cp2_attention_stack():
    _check_cp(run_distributed(_cp_worker, world_size=2, args=(ATTENTION_ONLY,), timeout=600))


@pytest.mark.parametrize("name", ["tiny_gdn_h1", "tiny_qwen3_next", "tiny_gdn_h2"])
def test_cp2_hybrid_presets(name):
    """GDN (state passing), Mamba2 (state passing) and attention / SWA layers in one stack."""
    _check_cp(run_distributed(_cp_worker, world_size=2, args=(name,), timeout=600))
