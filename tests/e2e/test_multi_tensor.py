"""The torch._foreach stand-ins for Megatron's per-tensor optimizer fallbacks: the same results
as Megatron's own fallbacks (the scale and copy bit for bit), installed only where Megatron
chose those fallbacks."""
import importlib

import pytest
import torch

from megatron_gdn.training import multi_tensor

pytest.importorskip("megatron.core")


def _tensors(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (64, 33), (1,), (2, 3, 4), (0,)]
    return [(torch.randn(s, generator=gen) * (i + 1)).to(dtype) for i, s in enumerate(shapes)]


def test_l2_norm_is_the_norm_of_all_tensors():
    ts = _tensors()
    flag = torch.zeros(1, dtype=torch.int)
    norm, per_tensor = multi_tensor.foreach_l2_norm(2048 * 32, flag, [ts], False)
    expected = torch.cat([t.double().flatten() for t in ts]).norm()
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert abs(norm.item() - expected.item()) <= 1e-6 * expected.item()
    empty, _ = multi_tensor.foreach_l2_norm(2048 * 32, flag, [[]], False)
    assert empty.shape == (1,) and empty.item() == 0.0


def test_scale_and_copy_match_megatrons_fallback_bit_for_bit():
    from megatron.core.utils import local_multi_tensor_scale

    flag = torch.zeros(1, dtype=torch.int)
    for scale in (1.0, 0.37):
        # fp32 main weights into bf16 model weights (the copy), and in place (the clip)
        src = _tensors()
        ours = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
        theirs = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
        multi_tensor.foreach_scale(2048 * 32, flag, [src, ours], scale)
        local_multi_tensor_scale(2048 * 32, flag, [src, theirs], scale)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
        ours = _tensors(seed=1)
        theirs = _tensors(seed=1)
        multi_tensor.foreach_scale(2048 * 32, flag, [ours, ours], scale)
        local_multi_tensor_scale(2048 * 32, flag, [theirs, theirs], scale)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_install_replaces_only_megatrons_fallbacks(monkeypatch):
    from megatron.core import utils as core_utils

    clip = importlib.import_module("megatron.core.optimizer.clip_grads")
    opt = importlib.import_module("megatron.core.optimizer.optimizer")
    # as Megatron sets them without TE / Apex (this machine has neither)
    monkeypatch.setattr(clip, "l2_norm_impl", core_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip, "multi_tensor_scale_impl", core_utils.local_multi_tensor_scale)
    sentinel = object()  # as if Apex's kernel had been imported
    monkeypatch.setattr(opt, "multi_tensor_scale_impl", sentinel)
    replaced = multi_tensor.install()
    assert "megatron.core.optimizer.clip_grads.l2_norm_impl" in replaced
    assert "megatron.core.optimizer.clip_grads.multi_tensor_scale_impl" in replaced
    assert "megatron.core.optimizer.optimizer.multi_tensor_scale_impl" not in replaced
    assert clip.l2_norm_impl is multi_tensor.foreach_l2_norm
    assert clip.multi_tensor_scale_impl is multi_tensor.foreach_scale
    assert opt.multi_tensor_scale_impl is sentinel
    assert not [r for r in multi_tensor.install() if "clip_grads" in r]  # idempotent


def _norm_and_clip_both_ways():
    """(rank body) Megatron's own get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 with its
    fallbacks and with the stand-ins: (norm, clipped gradients) for each."""
    import torch.distributed as dist

    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    clip = importlib.import_module("megatron.core.optimizer.clip_grads")
    results = {}
    for name, norm_impl, scale_impl in (
            ("megatron", local_multi_tensor_l2_norm, local_multi_tensor_scale),
            ("ours", multi_tensor.foreach_l2_norm, multi_tensor.foreach_scale)):
        clip.l2_norm_impl, clip.multi_tensor_scale_impl = norm_impl, scale_impl
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in _tensors()]
        for p, g in zip(params, _tensors(seed=3)):
            p.grad = g.clone()
        norm = clip.get_grad_norm_fp32([p.grad for p in params],
                                       grad_stats_parallel_group=dist.group.WORLD)
        clip.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
        results[name] = (norm, [p.grad.clone() for p in params])
    return results


def test_grad_norm_and_clip_through_megatron():
    """The norm and the clipped gradients of Megatron's clip_grads equal its fallback's, in a
    real (one-rank gloo) process group."""
    from megatron_gdn.testing.dist import run_distributed

    results = run_distributed(_norm_and_clip_both_ways, 1)[0]
    theirs, ours = results["megatron"], results["ours"]
    assert theirs[0] > 1.0  # the clip ran
    assert abs(ours[0] - theirs[0]) <= 1e-6 * theirs[0]
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
