"""causal_conv1d / causal_conv1d_update against the fp64 naive oracle, both backends (torch;
Triton: compiled on a GPU, under the interpreter on a CPU machine): forward, final state and
every gradient; the decode update against the full convolution token by token; argument errors.
Inputs live on tests/device.py's DEVICE; the argument checks and the oracle's own check run on
the CPU everywhere.

Legend: B batch, T tokens, D channels, W kernel width, N sequences (state rows).
"""

import pytest
import torch
import torch.nn.functional as F
from device import DEVICE, HALF_DTYPES
from tolerance import BF16_REL, FP32_REL, assert_close

from megatron_gdn.kernels.conv1d import causal_conv1d, causal_conv1d_update, naive_causal_conv1d
from megatron_gdn.kernels.conv1d.torch_ref import torch_causal_conv1d
from megatron_gdn.kernels.utils import force_backend

BACKENDS = ["torch", "triton"]


def make_inputs(B, T, D, W, N, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(D, W, generator=gen) / W ** 0.5
    bias = torch.randn(D, generator=gen)
    h0 = torch.randn(N, D, W - 1, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias, h0))


def check_against_oracle(backend, x, weight, bias, activation, h0, final, cu_seqlens, rel):
    """Forward (y and final state) and the gradients of x, weight, bias, initial_state under a
    random upstream gradient on y and on the final state, against the fp64 naive oracle."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, h0)]
    with force_backend(backend):
        y, ht = causal_conv1d(leaves[0], leaves[1], leaves[2], activation, leaves[3], final, cu_seqlens)
    ref_leaves = [t.detach().to(torch.float64).requires_grad_() if t is not None else None for t in (x, weight, bias, h0)]
    y_ref, ht_ref = naive_causal_conv1d(ref_leaves[0], ref_leaves[1], ref_leaves[2], activation, ref_leaves[3],
                                        final, cu_seqlens)
    assert y.dtype == x.dtype
    assert_close(y, y_ref, rel, "y")
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=gen).to(y.device)
    loss, loss_ref = (y.float() * dy).sum(), (y_ref * dy.double()).sum()
    if final:
        assert ht.shape == ht_ref.shape and ht.dtype == x.dtype
        assert_close(ht, ht_ref, rel, "final_state")
        dht = torch.randn(ht.shape, generator=gen).to(y.device)
        loss, loss_ref = loss + (ht.float() * dht).sum(), loss_ref + (ht_ref * dht.double()).sum()
    else:
        assert ht is None
    loss.backward()
    loss_ref.backward()
    for name, leaf, ref in zip(("dx", "dweight", "dbias", "dinitial_state"), leaves, ref_leaves):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, ref.grad, rel, name)


# B-T-D-W-initial_state-bias-activation-final_state; T = 150 crosses the Triton token blocks
# (16 forward, 128 per program backward), D = 33 / 130 leave partial
# channel blocks; W = 8 is the widest kernel
DENSE = [
    (2, 37, 20, 4, True, True, "silu", True),
    (1, 64, 8, 2, False, False, None, False),
    (3, 19, 33, 3, True, False, "silu", True),
    (1, 150, 12, 4, True, True, "silu", False),
    (2, 9, 130, 3, False, True, None, True),
    (2, 2, 16, 4, True, True, "silu", True),
    (1, 45, 10, 8, True, True, "silu", True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,D,W,use_h0,use_bias,activation,final", DENSE,
                         ids=[f"B{c[0]}-T{c[1]}-D{c[2]}-W{c[3]}-h0{int(c[4])}-bias{int(c[5])}-{c[6]}-ht{int(c[7])}"
                              for c in DENSE])
def test_dense(backend, B, T, D, W, use_h0, use_bias, activation, final):
    x, weight, bias, h0 = make_inputs(B, T, D, W, B)
    check_against_oracle(backend, x, weight, bias if use_bias else None, activation,
                         h0 if use_h0 else None, final, None, FP32_REL)


# lengths-W-initial_state-activation: sequences of length 0, 1 and 2 (< W-1 = 3), one crossing
# the Triton token blocks
PACKED = [
    ([1, 2, 8, 20, 6], 4, True, "silu"),
    ([1, 2, 8, 20, 6], 4, False, "silu"),
    ([3, 0, 1, 150], 4, True, None),
    ([5, 1, 1, 9], 2, True, "silu"),
    ([2, 7, 1, 12], 3, False, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,W,use_h0,activation", PACKED,
                         ids=[f"L{'_'.join(map(str, c[0]))}-W{c[1]}-h0{int(c[2])}-{c[3]}" for c in PACKED])
def test_packed(backend, lengths, W, use_h0, activation):
    D = 24
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    x, weight, bias, h0 = make_inputs(1, int(cu[-1]), D, W, len(lengths), seed=3)
    check_against_oracle(backend, x, weight, bias, activation, h0 if use_h0 else None, True, cu, FP32_REL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_separate_calls(backend):
    """No leak across boundaries: each packed sequence equals its own dense call."""
    lengths, D, W = [5, 1, 9], 16, 4
    cu = torch.tensor([0, 5, 6, 15], device=DEVICE)
    x, weight, bias, h0 = make_inputs(1, 15, D, W, 3, seed=5)
    with force_backend(backend):
        y, ht = causal_conv1d(x, weight, bias, "silu", h0, True, cu)
        for n in range(3):
            s, e = int(cu[n]), int(cu[n + 1])
            y_n, ht_n = causal_conv1d(x[:, s:e], weight, bias, "silu", h0[n:n + 1], True)
            assert_close(y[:, s:e], y_n, FP32_REL, f"y[seq {n}]")
            assert_close(ht[n:n + 1], ht_n, FP32_REL, f"final_state[seq {n}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_first", [False, True], ids=["btd", "sbd-transposed"])
def test_strided_x(backend, seq_first):
    """x as a channel slice of a wider projection output (token stride > D; with Megatron's
    [s, b, h] projection transposed, also batch stride < token stride) is read in place; its
    gradient lands in the slice only."""
    B, T, D, W = 2, 21, 12, 4
    wide, weight, bias, h0 = make_inputs(B, T, 3 * D, W, B, seed=7)
    weight, bias, h0 = weight[:D], bias[:D], h0[:, :D]
    if seq_first:
        wide = wide.transpose(0, 1).contiguous()
    wide.requires_grad_()
    x = (wide.transpose(0, 1) if seq_first else wide)[..., D:2 * D]
    assert not x.is_contiguous()
    with force_backend(backend):
        y, ht = causal_conv1d(x, weight, bias, "silu", h0, True)
    x_ref = x.detach().double().requires_grad_()
    y_ref, ht_ref = naive_causal_conv1d(x_ref, weight.double(), bias.double(), "silu", h0.double(), True)
    assert_close(y, y_ref, FP32_REL, "y")
    assert_close(ht, ht_ref, FP32_REL, "final_state")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (y * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    grad = wide.grad.transpose(0, 1) if seq_first else wide.grad
    assert_close(grad[..., D:2 * D], x_ref.grad, FP32_REL, "dx")
    assert wide.grad[..., :D].abs().max() == 0 and wide.grad[..., 2 * D:].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_fp16(backend, dtype):
    """Low-precision input (fp16; bf16 on a GPU, the interpreter mishandles it): output and
    gradients in the input dtype, computed in fp32."""
    x, weight, bias, h0 = make_inputs(2, 33, 16, 4, 2, dtype=dtype, seed=9)
    # fp16 keeps 11 mantissa bits, more than bf16: for it the bf16 bound is a conservative one
    check_against_oracle(backend, x, weight, bias, "silu", h0, True, None, BF16_REL)


def test_oracle_matches_grouped_conv():
    """The oracle itself against torch's grouped conv1d over [history | tokens] (independent code)."""
    B, T, D, W = 2, 13, 6, 4
    x, weight, bias, h0 = make_inputs(B, T, D, W, B, dtype=torch.float64, seed=11, device="cpu")
    y, ht = naive_causal_conv1d(x, weight, bias, "silu", h0, True)
    ext = torch.cat([h0, x.transpose(1, 2)], dim=2)
    expected = F.silu(F.conv1d(ext, weight[:, None, :], bias, groups=D)).transpose(1, 2)
    assert_close(y, expected, FP32_REL, "y")
    assert torch.equal(ht, ext[:, :, -(W - 1):])


def test_short_sequence_final_state_is_history_tail_then_tokens():
    D, W = 3, 4
    x = torch.arange(1.0, 3.0, device=DEVICE).view(1, 2, 1).expand(1, 2, D).contiguous()
    h0 = torch.tensor([10.0, 20.0, 30.0], device=DEVICE).view(1, 1, 3).expand(1, D, 3).contiguous()
    weight = torch.ones(D, W, device=DEVICE)
    for backend in BACKENDS:
        with force_backend(backend):
            _, ht = causal_conv1d(x, weight, None, None, h0, True)
        assert ht[0, 0].tolist() == [30.0, 1.0, 2.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W", [2, 3, 4, 8])
def test_update_equals_full_conv(backend, W):
    """A prefill of 18 tokens (more than one Triton token block), then one-token steps ([B, D]
    and [B, 1, D]), then a 3-token chunk: outputs and the in-place state equal one full
    convolution."""
    B, T, D = 3, 24, 20
    x, weight, bias, h0 = make_inputs(B, T, D, W, B, seed=13)
    y_ref, ht_ref = naive_causal_conv1d(x.double(), weight.double(), bias.double(), "silu", h0.double(), True)
    state = h0.clone()
    pieces = []
    with force_backend(backend):
        pieces.append(causal_conv1d_update(x[:, 0:18], state, weight, bias))
        for t in range(18, 21):
            step = x[:, t] if t % 2 else x[:, t:t + 1]
            out = causal_conv1d_update(step, state, weight, bias)
            assert out.shape == step.shape
            pieces.append(out if out.dim() == 3 else out[:, None])
        pieces.append(causal_conv1d_update(x[:, 21:24], state, weight, bias))
    assert_close(torch.cat(pieces, dim=1), y_ref, FP32_REL, "y")
    assert_close(state, ht_ref, FP32_REL, "conv_state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_after_prefill_without_activation(backend):
    """Decoding continues a causal_conv1d prefill through its final state."""
    B, T, D, W = 2, 10, 8, 4
    x, weight, bias, h0 = make_inputs(B, T, D, W, B, seed=17)
    y_ref, _ = naive_causal_conv1d(x.double(), weight.double(), None, None, None, False)
    with force_backend(backend):
        y_pre, state = causal_conv1d(x[:, :7], weight, None, None, None, True)
        steps = [causal_conv1d_update(x[:, t], state, weight, None, None) for t in range(7, 10)]
    assert_close(torch.cat([y_pre, torch.stack(steps, dim=1)], dim=1), y_ref, FP32_REL, "y")


def test_errors():
    # CPU tensors (the torch path) on every machine: the argument checks come before the dispatch
    x, weight, bias, h0 = make_inputs(2, 8, 6, 4, 2, device="cpu")
    cu = torch.tensor([0, 3, 8])
    with pytest.raises(ValueError, match="W=9"):
        causal_conv1d(x, torch.randn(6, 9))
    with pytest.raises(ValueError, match="W=1"):
        causal_conv1d(x, torch.randn(6, 1))
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d(x[0], weight)
    with pytest.raises(TypeError, match="x must be a floating"):
        causal_conv1d(x.to(torch.int32), weight)
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, weight, torch.randn(5))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, "relu")
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, weight, bias, "silu", torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="B=2"):
        causal_conv1d(x, weight, cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x[:1], weight, initial_state=h0[:1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="end at T"):
        causal_conv1d(x[:1], weight, cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        causal_conv1d(x[:1], weight, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="one device"):
        causal_conv1d(x, weight.to("meta"))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[:, 0], torch.zeros(2, 6, 2), weight)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d_update(x[0, 0], h0.clone(), weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_cuda_realistic(dtype, packed):
    """Triton on the GPU at layer sizes (q|k|v channels of 16+16+32 heads x 128, 8K tokens)
    against the fp64 torch path, which the CPU tests above tie to the oracle."""
    D, W = 8192, 4
    if packed:
        cu = torch.tensor([0, 1, 2, 1000, 4097, 8192], device="cuda")
        B, N = 1, 5
    else:
        cu, B, N = None, 2, 2
    x, weight, bias, h0 = make_inputs(B, 8192 // B, D, W, N, dtype=dtype, seed=19, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, h0)]
    y, ht = causal_conv1d(leaves[0], leaves[1], leaves[2], "silu", leaves[3], True, cu)
    ref = [t.double().requires_grad_() for t in (x, weight, bias, h0)]
    cu_list = cu.tolist() if cu is not None else None
    y_ref, ht_ref = torch_causal_conv1d(ref[0], ref[1], ref[2], "silu", ref[3], True, cu_list)
    rel = FP32_REL if dtype == torch.float32 else BF16_REL
    assert_close(y, y_ref, rel, "y")
    assert_close(ht, ht_ref, rel, "final_state")
    dy = torch.randn_like(y)
    dht = torch.randn_like(ht)
    ((y.float() * dy).sum() + (ht.float() * dht).sum()).backward()
    ((y_ref * dy.double()).sum() + (ht_ref * dht.double()).sum()).backward()
    for name, leaf, r in zip(("dx", "dweight", "dbias", "dinitial_state"), leaves, ref):
        assert_close(leaf.grad, r.grad, rel, name)
