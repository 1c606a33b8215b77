"""megatron-core's own GPTModel (local spec) on CPU + gloo against one process with the same weights.

One launch of 2 processes runs every configuration in turn (imports dominate the cost):
a TP=1 reference, TP=2, TP=2 + sequence parallel, PP=2 through the 1F1B schedule and DP=2
with Megatron's DDP. Each configuration trains one step through `get_forward_backward_func`
(so `finalize_model_grads` runs) and returns the loss, the full logits and every parameter
gradient, TP shards gathered, to the parent, which compares them with the reference.

Same global weights: TP runs seed the CPU RNG identically on every rank before the model is
built (`use_cpu_initialization` draws master weights on the CPU and slices them); PP stages
load the reference state dict, since a stage builds only its own layers.
"""
import pytest
import torch

from megatron_gdn.testing.dist import destroy_megatron, init_megatron, run_distributed
from tolerance import FP32_REL, assert_close

SEED = 1234
LAYERS, HIDDEN, HEADS, VOCAB, SEQ, BATCH = 2, 32, 4, 128, 16, 4
MICRO_BATCHES = 2


def _config(tp=1, pp=1, sp=False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )


def _build(config, seed=SEED, state_dict=None):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        share_embeddings_and_output_weights=True,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if state_dict is not None:
        _load_stage(model, state_dict)
    config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config, DistributedDataParallelConfig(), model)


def _load_stage(model, full_state):
    """Load a PP=1 state dict into this pipeline stage (local layer i is global offset + i)."""
    from megatron.core import parallel_state

    stage_layers = LAYERS // parallel_state.get_pipeline_model_parallel_world_size()
    offset = parallel_state.get_pipeline_model_parallel_rank() * stage_layers
    local = {}
    for name in model.state_dict():
        if name.endswith("_extra_state"):
            continue
        if name == "output_layer.weight" and name not in full_state:
            # tied output layer on the last stage: a copy of the word embeddings
            source = "embedding.word_embeddings.weight"
        elif name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            source = f"decoder.layers.{int(index) + offset}.{rest}"
        else:
            source = name
        local[name] = full_state[source]
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


def _batch():
    gen = torch.Generator().manual_seed(SEED + 1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _gather_tp(tensor, param):
    """Concatenate the TP shards of a tensor-parallel parameter (or its grad) along its split dim."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.clone()
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    group = parallel_state.get_tensor_model_parallel_group()
    torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    return torch.cat(shards, dim=param.partition_dim)


def _train_step(ddp_model, tokens, labels):
    """One forward/backward through Megatron's schedule; returns (loss, logits, grads) for the
    stage this rank holds (logits and loss only on the last stage)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = tokens.shape[0] // MICRO_BATCHES
    data = iter([(tokens[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro])
                 for i in range(MICRO_BATCHES)])
    logits_out = []

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        position_ids = torch.arange(SEQ).unsqueeze(0).expand_as(tok)
        output = model(tok, position_ids, None)

        def loss_func(output_tensor):
            logits_out.append(output_tensor.detach())
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            # logits [b, s, v/tp] -> loss per token; mean over this micro-batch's tokens
            loss = vocab_parallel_cross_entropy(output_tensor.transpose(0, 1).contiguous(),
                                                lab.t().contiguous())
            loss = loss.float().mean()
            # the schedule divides the returned loss in place by the micro-batch count
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    ddp_model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[ddp_model],
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=micro,
        forward_only=False,
    )
    grads = {}
    for name, param in ddp_model.module.named_parameters():
        grads[name] = _gather_tp(param.main_grad, param)
    loss = logits = None
    if parallel_state.is_pipeline_last_stage():
        loss = torch.stack([item["loss"] for item in losses]).mean()
        logits = _gather_vocab(torch.cat(logits_out, dim=0))
    return loss, logits, grads


def _gather_vocab(logits):
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(tp)]
    group = parallel_state.get_tensor_model_parallel_group()
    torch.distributed.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def _all_configs():
    """Runs on each of 2 ranks; returns {config: (loss, logits, grads)} (rank-local view)."""
    from megatron.core import parallel_state

    tokens, labels = _batch()
    results = {}

    # reference: TP=1, PP=1, every rank the full batch (DP=2 averages identical grads)
    init_megatron(tp=1)
    model = _build(_config())
    results["ref"] = _train_step(model, tokens, labels)
    full_state = {k: v.clone() for k, v in model.module.state_dict().items()
                  if not k.endswith("_extra_state")}
    destroy_megatron()

    for name, sp in (("tp2", False), ("tp2_sp", True)):
        init_megatron(tp=2)
        model = _build(_config(tp=2, sp=sp))
        results[name] = _train_step(model, tokens, labels)
        destroy_megatron()

    init_megatron(pp=2)
    model = _build(_config(pp=2), state_dict=full_state)
    loss, logits, grads = _train_step(model, tokens, labels)
    offset = parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // 2)
    renamed = {}
    for key, grad in grads.items():
        if key.startswith("decoder.layers."):
            index, rest = key[len("decoder.layers."):].split(".", 1)
            key = f"decoder.layers.{int(index) + offset}.{rest}"
        elif key == "output_layer.weight":
            key = "embedding.word_embeddings.weight"
        renamed[key] = grad
    results["pp2"] = (loss, logits, renamed)
    destroy_megatron()

    # DP=2: each rank half of the batch; DDP averages the grads
    init_megatron(tp=1, dp=2)
    rank = parallel_state.get_data_parallel_rank()
    half = BATCH // 2
    model = _build(_config())
    results["dp2"] = _train_step(model, tokens[rank * half:(rank + 1) * half],
                                 labels[rank * half:(rank + 1) * half])
    destroy_megatron()
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_all_configs, world_size=2, timeout=300)


def _check_grads(grads, ref_grads, label):
    assert grads, f"{label}: no gradients"
    for name, grad in grads.items():
        assert name in ref_grads, f"{label}: unexpected parameter {name}"
        assert_close(grad, ref_grads[name], FP32_REL, f"{label} grad {name}")


@pytest.mark.parametrize("config", ["tp2", "tp2_sp"])
def test_tensor_parallel_matches_one_process(runs, config):
    ref_loss, ref_logits, ref_grads = runs[0]["ref"]
    for rank in range(2):
        loss, logits, grads = runs[rank][config]
        assert_close(loss, ref_loss, FP32_REL, f"{config} loss rank {rank}")
        assert_close(logits, ref_logits, FP32_REL, f"{config} logits rank {rank}")
        assert set(grads) == set(ref_grads)
        _check_grads(grads, ref_grads, f"{config} rank {rank}")


def test_pipeline_parallel_matches_one_process(runs):
    ref_loss, ref_logits, ref_grads = runs[0]["ref"]
    first, last = runs[0]["pp2"], runs[1]["pp2"]
    assert first[0] is None and last[0] is not None
    assert_close(last[0], ref_loss, FP32_REL, "pp2 loss")
    assert_close(last[1], ref_logits, FP32_REL, "pp2 logits")
    # every parameter lives on some stage; the tied embedding on both (grads all-reduced)
    assert set(first[2]) | set(last[2]) == set(ref_grads)
    _check_grads(first[2], ref_grads, "pp2 stage 0")
    _check_grads(last[2], ref_grads, "pp2 stage 1")


def test_data_parallel_ddp_matches_full_batch(runs):
    ref_loss, _, ref_grads = runs[0]["ref"]
    losses = [runs[rank]["dp2"][0] for rank in range(2)]
    assert_close(sum(losses) / 2, ref_loss, FP32_REL, "dp2 mean loss")
    for rank in range(2):
        _check_grads(runs[rank]["dp2"][2], ref_grads, f"dp2 rank {rank}")


def test_reference_is_not_trivial(runs):
    """Guard the comparisons: the reference has a real loss and non-zero grads everywhere."""
    ref_loss, ref_logits, ref_grads = runs[0]["ref"]
    assert 3.0 < ref_loss.item() < 7.0  # ~ln(128) for random weights
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, f"reference grad of {name} is all zero"
