"""torch's fused Adam for Megatron's optimizer without TE / Apex: the switch takes every torch
Adam / AdamW group inside a Megatron-style optimizer, gives the multi-tensor form's updates to
rounding, leaves groups with state and other optimizers alone, and wraps megatron-core's
factory only where it uses torch's optimizers."""
import pytest
import torch

from megatron_gdn.training import fused_adam

pytest.importorskip("megatron.core")


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((7, 5), (33,), (4, 3, 2))]


class _Wrapper:
    """Megatron's layout: a MegatronOptimizer holds the torch one as `.optimizer`, a
    ChainedOptimizer its parts as `.chained_optimizers`."""

    def __init__(self, optimizer=None, parts=None):
        self.optimizer = optimizer
        self.chained_optimizers = parts


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_fused_matches_multi_tensor(cls):
    ref_params, params = _params(), _params()
    ref = cls(ref_params, lr=1e-2, weight_decay=0.1, foreach=True)
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    chained = _Wrapper(parts=[_Wrapper(optimizer=opt)])
    assert fused_adam.fuse(chained) == 1 and opt.param_groups[0]["fused"]
    assert fused_adam.fuse(chained) == 0  # already fused
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ref_params, params):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ref.step()
        opt.step()
    for a, b, start in zip(ref_params, params, _params()):
        assert not torch.equal(b, start)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fuse_leaves_state_and_other_optimizers():
    params = _params()
    sgd = torch.optim.SGD(params[:1], lr=0.1)
    started = torch.optim.AdamW(params[1:2], lr=0.1)
    params[1].grad = torch.ones_like(params[1])
    started.step()  # state with a step counter: left as it is
    fresh = torch.optim.AdamW(params[2:], lr=0.1)
    assert fused_adam.fuse(_Wrapper(parts=[sgd, started, fresh])) == 1
    assert not sgd.param_groups[0].get("fused")
    assert not started.param_groups[0]["fused"] and fresh.param_groups[0]["fused"]


def test_install_wraps_the_factory_only_with_torch_optimizers(monkeypatch):
    from megatron.core import optimizer as core_optimizer

    built = []

    def factory(params):
        built.append(torch.optim.AdamW(params, lr=0.1))
        return _Wrapper(optimizer=built[-1])

    monkeypatch.setattr(core_optimizer, "_get_megatron_optimizer_based_on_param_groups", factory)
    monkeypatch.setattr(core_optimizer, "USING_PYTORCH_OPTIMIZER", False)  # TE / Apex serve it
    assert not fused_adam.install()
    assert core_optimizer._get_megatron_optimizer_based_on_param_groups is factory
    monkeypatch.setattr(core_optimizer, "USING_PYTORCH_OPTIMIZER", True)
    assert fused_adam.install() and fused_adam.install()  # idempotent: wrapped once
    wrapped = core_optimizer._get_megatron_optimizer_based_on_param_groups
    assert wrapped.__wrapped__ is factory
    wrapped(_params())
    assert len(built) == 1 and built[0].param_groups[0]["fused"]
