"""The tiny GDN-H2 preset (examples/configs/tiny_gdn_h2.yaml: mamba2 -> gdn -> swa, each with
an MLP) as a GPTModel from YAML: its parameter count equals the analytic one, and under PP=2
(1F1B over two micro-batches, Megatron's schedule, DDP, finalize_model_grads) the loss, the
logits and every parameter gradient match one process (FP32_REL). Uses the helpers of
tests/hybrid/test_hybrid_parallel.py (same weights, same training step)."""
from hybrid.test_hybrid_parallel import _batch, _build, _compare, _load, _train_step
from megatron_gdn.testing.dist import destroy_megatron, init_megatron, run_distributed

NAME = "tiny_gdn_h2"


def _pp_worker():
    from megatron_gdn.hybrid import yaml_loader as yl

    hm = _load(NAME)
    tokens, labels = _batch(hm)
    out = {}
    init_megatron(tp=1)
    model, config = _build(hm)
    out["count"] = (sum(p.numel() for p in model.module.parameters()), yl.count_parameters(hm)["total"])
    state = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    out[(NAME, "ref")] = _train_step(hm, model, config, tokens, labels)
    destroy_megatron()

    init_megatron(pp=2)
    # three Megatron layers: [mamba2+mlp, gdn+mlp] on stage 0, [swa+mlp] on stage 1
    model, config = _build(hm, state, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=2)
    out[(NAME, "pp2")] = _train_step(hm, model, config, tokens, labels)
    destroy_megatron()
    return out


def test_tiny_h2_pp2_vs_one_process():
    results = run_distributed(_pp_worker, world_size=2, timeout=600)
    built, analytic = results[0]["count"]
    assert built == analytic, (built, analytic)
    _compare(results, NAME, "pp2", "ref")
