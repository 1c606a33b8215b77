"""The stand-in for Apex's fused weight-gradient extension (megatron_gdn.training.wgrad_fusion):
main_grad += grad_output^T input exactly, registered for Megatron only where it works."""
import sys

import pytest
import torch

from megatron_gdn.training import wgrad_fusion

pytest.importorskip("megatron.core")


def _case(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 48, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(300, 40, generator=gen).to(device=device, dtype=dtype)
    acc = torch.randn(40, 48, generator=gen).to(device)
    return x, dy, acc


def test_fp32_operands_accumulate_in_place():
    x, dy, acc = _case(torch.float32, "cpu")
    expected = acc.double() + dy.double().t() @ x.double()
    target = acc
    wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, target)
    assert target is acc
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 operands into fp32: CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_operands_into_fp32_on_the_gpu(dtype):
    assert wgrad_fusion.works_on(torch.device("cuda"), dtype)
    x, dy, acc = _case(dtype, "cuda")
    expected = acc.double() + dy.double().t() @ x.double()
    ptr = acc.data_ptr()
    wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, acc)
    assert acc.data_ptr() == ptr and acc.dtype == torch.float32
    err = ((acc.double() - expected).norm() / expected.norm()).item()
    assert err < 1e-6, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU has no half-to-fp32 matmul")
def test_not_installed_where_it_does_not_work(monkeypatch):
    monkeypatch.delitem(sys.modules, wgrad_fusion.MODULE_NAME, raising=False)
    assert not wgrad_fusion.works_on(torch.device("cpu"))
    assert wgrad_fusion.install(torch.device("cpu")) is None
    assert wgrad_fusion.MODULE_NAME not in sys.modules
    assert not wgrad_fusion.usable_here()


def test_install_registers_for_megatrons_linears(monkeypatch):
    """Where the check passes (forced here), Megatron's tensor-parallel linears see the stand-in
    as the extension they looked for at import."""
    from megatron.core.tensor_parallel import layers

    monkeypatch.delitem(sys.modules, wgrad_fusion.MODULE_NAME, raising=False)
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    monkeypatch.setattr(wgrad_fusion, "works_on", lambda device, dtype=torch.bfloat16: True)
    try:
        assert wgrad_fusion.install(torch.device("cpu")) == "torch.addmm"
        module = sys.modules[wgrad_fusion.MODULE_NAME]
        assert layers._grad_accum_fusion_available
        assert layers.fused_weight_gradient_mlp_cuda is module
        assert module.wgrad_gemm_accum_fp32 is wgrad_fusion.wgrad_gemm_accum_fp32
        assert wgrad_fusion.install(torch.device("cpu")) == "torch.addmm"  # idempotent
        assert wgrad_fusion.usable_here()
    finally:
        sys.modules.pop(wgrad_fusion.MODULE_NAME, None)
