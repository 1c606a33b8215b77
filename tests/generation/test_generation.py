"""Prefill (chunk kernel, packed prompts of different lengths) + step-by-step decoding
(recurrent kernel, conv state, KV caches) gives the logits of one full forward over the
generated sequences: GDN only, GDN + SWA (window 8, shorter than most sequences: the ring buffer
wraps), Mamba2 -> GDN -> SWA (H2), and a converted Qwen3-Next (GDN + gated attention with
partial RoPE, MoE). Prompts of 1 and 2 tokens (shorter than the conv's W-1 = 3 inputs of state)
and one of 70 (past the chunk kernels' 64-token chunk) check the captured final states.
Sampling: top_k=1 and a tiny top_p are greedy; a seeded generator reproduces its tokens."""
import pytest
import torch

from megatron_gdn.testing.dist import megatron_parallel, run_distributed
from tolerance import FP32_REL, assert_close

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [5] * 12, [4], [11, 12], [(7 * i) % 100 + 1 for i in range(70)]]
NEW_TOKENS = 8


def _check_decoding(config_name, ckpt_dir=None):
    from megatron_gdn.generation import generate, sample
    from megatron_gdn.hybrid import yaml_loader as yl

    with megatron_parallel(tp=1):
        torch.manual_seed(0)
        if ckpt_dir is None:
            hm = yl.load(f"examples/configs/{config_name}.yaml")
            model = yl.build_gpt_model(hm, yl.transformer_config(hm, use_cpu_initialization=True)).eval()
        else:
            from megatron_gdn.convert import build_model

            model = build_model(ckpt_dir).eval()
        result = generate(model, PROMPTS, NEW_TOKENS, return_logits=True)
        full = []
        for prompt, new in zip(PROMPTS, result.tokens):
            seq = torch.tensor(prompt + new)[None]
            with torch.no_grad():
                full.append(model(seq, torch.arange(seq.shape[1])[None], None)[0])
        sampled = {
            "top_k1": generate(model, PROMPTS, 4, temperature=1.0, top_k=1).tokens,
            "top_p_tiny": generate(model, PROMPTS, 4, temperature=0.7, top_p=1e-6).tokens,
            "seed_a": generate(model, PROMPTS, 4, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(5)).tokens,
            "seed_b": generate(model, PROMPTS, 4, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(5)).tokens,
        }
        with pytest.raises(ValueError, match="top_p must be in"):
            sample(torch.zeros(1, 4), 1.0, 0, 0.0)
        return result.tokens, result.logits, full, sampled, result.state_bytes


@pytest.mark.parametrize("config_name", ["tiny_gdn", "tiny_gdn_h1", "tiny_gdn_h2"])
def test_decoding_matches_full_forward(config_name):
    (out,) = run_distributed(_check_decoding, world_size=1, args=(config_name,))
    _assert_decoding(*out)


def test_converted_qwen3_next_decoding(tmp_path):
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
    from test_qwen3_next import convert_to_dir, tiny_model

    convert_to_dir(tiny_model(seed=13), tmp_path)
    (out,) = run_distributed(_check_decoding, world_size=1, args=("qwen3_next", str(tmp_path)))
    _assert_decoding(*out)


def _assert_decoding(tokens, logits, full, sampled, state_bytes):
    for n, (prompt, new, lg, ref) in enumerate(zip(PROMPTS, tokens, logits, full)):
        assert len(new) == NEW_TOKENS
        assert lg.shape[0] == len(prompt) + NEW_TOKENS - 1
        assert_close(lg, ref[:lg.shape[0]], FP32_REL, f"prompt {n}: prefill + decode logits")
        # greedy: every generated token is the argmax of the full forward at the position before
        assert new == ref[len(prompt) - 1:len(prompt) - 1 + NEW_TOKENS].argmax(-1).tolist()
    greedy4 = [t[:4] for t in tokens]
    assert sampled["top_k1"] == greedy4
    assert sampled["top_p_tiny"] == greedy4
    assert sampled["seed_a"] == sampled["seed_b"]
    assert state_bytes > 0


def test_ablation_variants_have_no_decoding_path_yet():
    """A GDN layer without decay / short conv / output gate is refused by name, not decoded wrong."""
    from types import SimpleNamespace

    from megatron_gdn.generation import mixers

    for option in ("use_output_gate", "use_short_conv", "use_decay"):
        layer = SimpleNamespace(use_output_gate=True, use_short_conv=True, use_decay=True)
        setattr(layer, option, False)
        with pytest.raises(NotImplementedError, match=f"{option}=False"):
            mixers._gdn_project(layer, None)
