"""A converted tiny Qwen3-Next saved as a Megatron distributed checkpoint (one process, TP=1)
loads at TP=2 (two gloo processes, GDN sections and gated QKV resharded by the checkpoint's
section split) and gives the source model's logits."""
import torch

from megatron_gdn.testing.dist import megatron_parallel, run_distributed
from test_qwen3_next import LOGITS_REL, convert_to_dir, tiny_model
from tolerance import assert_close


def _save_dist(ckpt_dir):
    from megatron_gdn.convert import save_dist

    with megatron_parallel(tp=1):
        return str(save_dist(ckpt_dir))


def _tp2_logits(ckpt_dir, tokens):
    from megatron.core import parallel_state

    from megatron_gdn.convert import build_model

    with megatron_parallel(tp=2):
        model = build_model(ckpt_dir).eval()
        positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
        with torch.no_grad():
            local = model(tokens, positions, None)                   # [b, s, vocab / tp]
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(local) for _ in range(2)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=-1)


def test_tp2_dist_checkpoint_matches(tmp_path):
    hf = tiny_model(seed=11)
    convert_to_dir(hf, tmp_path)
    run_distributed(_save_dist, world_size=1, args=(str(tmp_path),))
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    rank0, rank1 = run_distributed(_tp2_logits, world_size=2, args=(str(tmp_path), tokens))
    assert_close(rank0, expected, LOGITS_REL, "tp2 logits (rank 0)")
    assert torch.equal(rank0, rank1)
