"""DeepSpeed ZeRO 1/2/3 runs of a tiny GDN model against the Megatron-only run of the same model
and data (examples/pretrain_gdn_deepspeed.py): the same loss curve over 10 steps in fp32, with
data parallelism, TP=2 and CP=2, and a resume from a DeepSpeed checkpoint that reproduces the
uninterrupted losses.

Runs on DeepSpeed's CPU accelerator with gloo (DS_ACCELERATOR=cpu); skipped only when
deepspeed cannot be imported (it is the optional `deepspeed` extra).
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from megatron_gdn.testing.dist import run_distributed
from tolerance import BF16_REL, FP32_REL, assert_close

# found, not imported: the ranks import it (with DS_ACCELERATOR set), the pytest process need not
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (optional extra: "
                                "pip install megatron-gdn[deepspeed])")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pretrain_gdn_deepspeed.py"
YAML = ROOT / "examples" / "configs" / "tiny_gdn.yaml"
STEPS = 10
# per data-parallel rank; the reference reads the whole global batch in one micro-batch
MICRO_BATCH = 2
SEQ = 32
TIGHT_CLIP = 0.05


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_gdn_deepspeed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(argv):
    """One training run on this rank (inside run_distributed); its per-step losses."""
    os.environ["DS_ACCELERATOR"] = "cpu" if not torch.cuda.is_available() else "cuda"
    ex = _example()
    fp32 = [] if "--bf16" in argv else ["--fp32"]
    argv = [a for a in argv if a != "--bf16"]
    args = ex.parse_args(["--model-yaml", str(YAML), "--seq-length", str(SEQ), "--lr", "3e-3",
                          "--log-interval", "100"] + fp32 + argv)
    from megatron.core import parallel_state

    try:
        return ex.train(args)["losses"]
    finally:
        parallel_state.destroy_model_parallel()


_reference = {}


def _reference_losses(dp, extra=()):
    """Megatron-only (no DeepSpeed), one rank, the global batch of `dp` ranks per step."""
    key = (dp, tuple(extra))
    if key not in _reference:
        (losses,) = run_distributed(_run, 1, args=(["--engine", "megatron", "--train-iters",
                                                   str(STEPS), "--micro-batch-size",
                                                   str(MICRO_BATCH * dp)] + list(extra),))
        _reference[key] = torch.tensor(losses)
    return _reference[key]


def _check(per_rank, expected, name, rel=FP32_REL):
    for rank, losses in enumerate(per_rank):
        assert_close(torch.tensor(losses), expected, rel, f"{name} rank {rank}")


@pytest.mark.parametrize("stage", [1, 2, 3], ids=["zero1", "zero2", "zero3"])
def test_zero_dp2_matches_megatron(stage):
    ranks = run_distributed(_run, 2, args=(["--ds-config", f"{ROOT}/examples/deepspeed/zero{stage}.json",
                                            "--train-iters", str(STEPS), "--micro-batch-size",
                                            str(MICRO_BATCH)],))
    _check(ranks, _reference_losses(2), f"zero{stage} dp2")


@pytest.mark.parametrize("stage", [1, 3], ids=["zero1", "zero3"])
def test_zero_tp2_matches_megatron(stage):
    # a clip far below the gradient norm (about 1 here): every step is clipped, so the norm
    # must count each TP shard once and each replicated parameter once
    clip = ["--clip-grad", str(TIGHT_CLIP)]
    ranks = run_distributed(_run, 2, args=(["--ds-config", f"{ROOT}/examples/deepspeed/zero{stage}.json",
                                            "--tensor-model-parallel-size", "2",
                                            "--train-iters", str(STEPS), "--micro-batch-size",
                                            str(MICRO_BATCH)] + clip,))
    _check(ranks, _reference_losses(1, clip), f"zero{stage} tp2 clipped")
    assert not torch.allclose(_reference_losses(1, clip), _reference_losses(1), rtol=FP32_REL), \
        "the tight clip did not change the reference run: the norm counting is not exercised"


def test_zero3_bf16_close_to_fp32_megatron():
    ranks = run_distributed(_run, 2, args=(["--ds-config", f"{ROOT}/examples/deepspeed/zero3.json",
                                            "--bf16", "--train-iters", str(STEPS),
                                            "--micro-batch-size", str(MICRO_BATCH)],))
    _check(ranks, _reference_losses(2), "zero3 dp2 bf16", rel=BF16_REL)


def test_zero2_cp2_matches_megatron():
    ranks = run_distributed(_run, 2, args=(["--ds-config", f"{ROOT}/examples/deepspeed/zero2.json",
                                            "--context-parallel-size", "2",
                                            "--train-iters", str(STEPS), "--micro-batch-size",
                                            str(MICRO_BATCH)],))
    _check(ranks, _reference_losses(1), "zero2 cp2")


def _write_indexed(prefix):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    gen = numpy.random.default_rng(7)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for length in (50, 120, 33, 400, 90):
        # a skewed distribution so the model has something to learn
        builder.add_document(gen.zipf(1.5, size=length).clip(max=127).astype(numpy.int64), [length])
    builder.finalize(f"{prefix}.idx")


def test_zero2_indexed_data_matches_megatron(tmp_path):
    prefix = str(tmp_path / "tiny_text_document")
    _write_indexed(prefix)
    data = ["--data-path", prefix]
    ranks = run_distributed(_run, 2, args=(["--ds-config", f"{ROOT}/examples/deepspeed/zero2.json",
                                            "--train-iters", str(STEPS), "--micro-batch-size",
                                            str(MICRO_BATCH)] + data,))
    expected = _reference_losses(2, data)
    _check(ranks, expected, "zero2 dp2 indexed data")
    assert expected[-1] < expected[0], "the loss on the skewed data did not go down"


def test_zero3_resume_reproduces_losses(tmp_path):
    common = ["--ds-config", f"{ROOT}/examples/deepspeed/zero3.json", "--micro-batch-size",
              str(MICRO_BATCH)]
    whole = run_distributed(_run, 2, args=(common + ["--train-iters", str(STEPS)],))
    run_distributed(_run, 2, args=(common + ["--train-iters", str(STEPS // 2),
                                             "--out", str(tmp_path)],))
    assert (tmp_path / "checkpoints" / "latest").is_file()
    resumed = run_distributed(_run, 2, args=(common + ["--train-iters", str(STEPS),
                                                       "--load", str(tmp_path)],))
    for rank in range(2):
        assert len(resumed[rank]) == STEPS - STEPS // 2
        assert_close(torch.tensor(resumed[rank]), torch.tensor(whole[rank][STEPS // 2:]),
                     FP32_REL, f"zero3 resume rank {rank}")
