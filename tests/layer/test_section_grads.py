"""megatron_gdn.section_grads: a fused projection's sections whose gradient the consumers'
backward kernels write into one buffer (no concatenation). The split's gradient equals
torch.split's whether the hints are taken (the Triton conv and gated norm write in place),
ignored (the torch paths: copied in), or the section is unused or used twice; and the GDN layer
on the Triton kernels takes them for q, k, v and z."""
import pytest
import torch

from megatron_gdn.kernels.conv1d import causal_conv1d
from megatron_gdn.kernels.gated_norm import gated_rmsnorm
from megatron_gdn.kernels.utils import force_backend
from megatron_gdn.section_grads import split_sections
from device import DEVICE

WIDTHS = [12, 12, 8, 8, 2, 2, 4]  # q, k, v, z, b, a, pad


def _consume(views, grads, hints):
    """q, k, v through the conv (hints optional), z gating v's conv output in the norm, b used
    twice, a not at all, pad not at all: a scalar loss."""
    s, b = views[0].shape[:2]
    outs = []
    for i in range(3):
        w = torch.linspace(-1, 1, views[i].shape[-1] * 4, device=views[i].device).view(-1, 4)
        hint = {"dx_into": grads.into(i, lambda t: t.transpose(0, 1))} if hints else {}
        outs.append(causal_conv1d(views[i].transpose(0, 1), w.to(views[i].dtype), None, "silu", **hint)[0])
    z = views[3].view(s, b, 2, 4)
    hint = {"dz_into": grads.into(3, lambda t: t.view(s, b, 2, 4))} if hints else {}
    y = gated_rmsnorm(outs[2].transpose(0, 1).reshape(s, b, 2, 4), z,
                      torch.ones(4, device=z.device, dtype=z.dtype), **hint)
    gen = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outs[:2])
    loss = loss + (y * torch.randn(y.shape, generator=gen).to(y)).sum()
    return loss + (views[4] ** 2).sum() + (views[4] * 3).sum()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_equals_torch_split(backend):
    device = DEVICE if backend == "triton" else "cpu"
    x = torch.randn(9, 2, sum(WIDTHS), device=device, requires_grad=True)
    with force_backend(backend):
        views, grads = split_sections(x, WIDTHS)
        assert [v.data_ptr() for v in views] == [v.data_ptr() for v in torch.split(x, WIDTHS, -1)]
        _consume(views, grads, hints=True).backward()
        got = x.grad.clone()
        x.grad = None
        _consume(list(torch.split(x, WIDTHS, -1)), grads, hints=False).backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[..., -6:], torch.zeros_like(got[..., -6:]))  # a and pad: zeros
    # the Triton backward kernels wrote q, k, v and z in place; b (used twice) was copied
    assert (grads.in_place, grads.copied) == ((0, 5) if backend == "torch" else (4, 1))


def test_no_grad_and_bad_widths():
    x = torch.randn(3, 10)
    views, _ = split_sections(x, [4, 6])
    assert [v.shape[-1] for v in views] == [4, 6]
    with pytest.raises(ValueError, match="sum to 9"):
        split_sections(x, [4, 5])


def test_a_misfit_hint_is_ignored():
    """A destination of the wrong shape: the conv allocates its own dx and the split copies."""
    x = torch.randn(2, 7, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4, device=DEVICE)
    with force_backend("triton"):
        y, _ = causal_conv1d(x, w, None, "silu", dx_into=lambda: torch.empty(2, 7, 5, device=DEVICE))
        y.sum().backward()
        ref = x.grad.clone()
        x.grad = None
        causal_conv1d(x, w, None, "silu")[0].sum().backward()
    torch.testing.assert_close(ref, x.grad)
