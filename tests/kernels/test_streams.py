"""kernels/utils/streams.py: two groups of launches side by side, or in line off the GPU."""
import pytest
import torch

from megatron_gdn.kernels.utils.streams import beside, side_stream


@pytest.mark.parametrize("overlap", [False, True])
def test_in_line_off_the_gpu(overlap):
    """On a CPU device (or with overlap off) the second group runs first, then the first, on
    the caller's stream: the backward's order before the side stream existed."""
    order = []
    beside(torch.device("cpu"), overlap, lambda: order.append("first"),
           lambda: order.append("second"), ())
    assert order == ["second", "first"]
    assert side_stream(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams: CUDA only")
def test_the_side_stream_is_joined():
    """What the side stream writes is there for the caller's stream right after the call, and
    it waited for the caller's earlier work (x written just before)."""
    x = torch.empty(1 << 24, device="cuda")
    x.fill_(2.0)
    y = torch.empty_like(x)
    z = torch.empty_like(x)
    beside(x.device, True, lambda: z.copy_(x * 3), lambda: y.copy_(x + 1), (x, y))
    assert side_stream(x.device) is not None
    assert torch.equal(y, torch.full_like(x, 3.0)) and torch.equal(z, torch.full_like(x, 6.0))
