"""megatron_gdn.aligned_proj: a projection whose output rows are padded to a multiple of 8 in
memory (Hopper's matmul kernels need 16-byte aligned leading dimensions) gives the same output
and gradients as the plain projection; the GDN layer takes that path exactly when its in_proj
width is not a multiple of 8. The padded path under TP=2 and TP=2 + SP is compared with one
process in tests/layer/test_layer_parallel.py (the ablated layer's per-rank width, 132, is
padded; the one-process width, 264, is not)."""
import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module

import megatron_gdn.aligned_proj as aligned_proj
from megatron_gdn.aligned_proj import _PaddedRowsLinear, aligned_pad
from megatron_gdn.specs import get_gdn_mixer_spec


def test_pad_widths():
    assert [aligned_pad(n) for n in (8, 9228, 9232, 1, 7, 0)] == [0, 4, 0, 7, 1, 0]
    # the GDN 1.3B layer: 6 heads, K 256, V 512 -> [q|k|v|z|b|a] = 9228 wide
    assert aligned_pad(2 * 6 * 256 + 2 * 6 * 512 + 2 * 6) == 4


@pytest.mark.parametrize("bias", [False, True])
def test_padded_rows_match_the_plain_linear(bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(13, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    dy = torch.randn(5, 3, 13, dtype=torch.float64, generator=gen)
    y = _PaddedRowsLinear.apply(x, w, b, 3)
    assert y.shape == (5, 3, 16) and y.stride()[1] == 16
    if not bias:  # the pad columns hold zeros (with a bias, zeros of the padded bias too)
        assert torch.equal(y[..., 13:], torch.zeros(5, 3, 3, dtype=torch.float64))
    got = torch.autograd.grad(y[..., :13], [x, w] + ([b] if bias else []), dy)
    ref_y = F.linear(x, w, b)
    ref = torch.autograd.grad(ref_y, [x, w] + ([b] if bias else []), dy)
    torch.testing.assert_close(y[..., :13], ref_y, rtol=1e-12, atol=1e-12)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ddp_hook", [True, False])
def test_padded_rows_accumulate_into_main_grad(ddp_hook, monkeypatch):
    """With the linear's gradient-accumulation fusion, the weight gradient goes into the
    weight's main_grad in the matmul (as Megatron's linears do; main_grad as Megatron's DDP
    keeps it), and autograd gets the placeholder Megatron's DDP hook skips (or None without
    that hook's flag); the input gradient is unchanged. fp32 operands: the stand-in's CPU path."""
    from megatron.core.tensor_parallel import layers

    from megatron_gdn.training import wgrad_fusion

    fused = type("Fused", (), {"wgrad_gemm_accum_fp32": staticmethod(wgrad_fusion.wgrad_gemm_accum_fp32),
                               "wgrad_gemm_accum_fp16": staticmethod(wgrad_fusion.wgrad_gemm_accum_fp16)})
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", fused, raising=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, generator=gen, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(13, 16, generator=gen))
    dy = torch.randn(5, 3, 16, generator=gen)
    start = torch.randn(13, 16, generator=gen)
    w.main_grad = start.clone()
    if ddp_hook:
        w.grad_added_to_main_grad = False
    y = _PaddedRowsLinear.apply(x, w, None, 3, True)
    y.backward(dy)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    (F.linear(ref_x, ref_w) * dy[..., :13]).sum().backward()
    torch.testing.assert_close(w.main_grad, start + ref_w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    if ddp_hook:
        assert w.grad_added_to_main_grad and w.grad is not None and w.grad.shape == w.shape
    else:
        assert w.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32 product of bf16 operands needs a GPU")
def test_padded_rows_accumulate_bf16_on_gpu():
    """On a GPU with bf16 operands the fused weight gradient is formed over the padded rows in
    fp32 and its first n rows added to main_grad: equal to the fp32 product of the n rows."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 3, 64, generator=gen, **bf)
    w = torch.nn.Parameter(torch.randn(93, 64, generator=gen, **bf))
    dy = torch.randn(256, 3, 96, generator=gen, **bf)
    start = torch.randn(93, 64, generator=gen, device="cuda")
    w.main_grad = start.clone()
    _PaddedRowsLinear.apply(x, w, None, 3, True).backward(dy)
    ref = start + dy.reshape(-1, 96)[:, :93].float().t() @ x.reshape(-1, 64).float()
    torch.testing.assert_close(w.main_grad, ref, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def pg(one_rank_pg):
    return one_rank_pg


def _layer(pg, HV):
    # 1 key head of 16, HV value heads of 16: in_proj [q|k|v|z|b|a] = 32 + 32 HV + 2 HV wide
    config = TransformerConfig(
        num_layers=1, hidden_size=24, num_attention_heads=4, use_cpu_initialization=True,
        linear_num_key_heads=1, linear_num_value_heads=HV, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, layernorm_epsilon=1e-5)
    torch.manual_seed(0)
    return build_module(get_gdn_mixer_spec("local"), config=config, layer_number=1, pg_collection=pg)


def _run(layer, x, dout):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out, _ = layer(x, None)
    (out * dout).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("HV,padded", [(3, True), (4, False)])
def test_layer_takes_the_padded_path_only_when_misaligned(pg, monkeypatch, HV, padded):
    layer = _layer(pg, HV)
    assert (aligned_pad(32 + 34 * HV) > 0) == padded
    calls = []
    real = aligned_proj.padded_column_linear

    def spy(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(aligned_proj, "padded_column_linear", spy)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, 24, generator=gen)
    dout = torch.randn(20, 2, 24, generator=gen)
    got = _run(layer, x, dout)
    assert calls == ([aligned_pad(32 + 34 * HV)] if padded else [])
    # the same layer through Megatron's linear as it is
    monkeypatch.setattr(aligned_proj, "can_pad", lambda *a: False)
    ref = _run(layer, x, dout)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
