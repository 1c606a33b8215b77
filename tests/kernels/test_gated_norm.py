"""gated_rmsnorm against the fp64 naive oracle, both backends (torch; Triton: compiled on a
GPU, under the interpreter on a CPU machine): forward and the gradients of x, z and weight;
argument errors. Inputs live on tests/device.py's DEVICE; the argument checks and the oracle's
own check run on the CPU everywhere.

Legend: R rows, D normalised dim.
"""

import pytest
import torch
import torch.nn.functional as F
from device import DEVICE, HALF_DTYPES
from tolerance import BF16_REL, FP32_REL, assert_close

from megatron_gdn.kernels.gated_norm import gate_then_rmsnorm, gated_rmsnorm, naive_gated_rmsnorm
from megatron_gdn.kernels.gated_norm import norm as norm_module
from megatron_gdn.kernels.gated_norm.torch_ref import torch_gated_rmsnorm
from megatron_gdn.kernels.utils import force_backend

BACKENDS = ["torch", "triton"]


def make_inputs(shape, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    z = torch.randn(shape, generator=gen) * 2
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, z, weight))


def check_against_oracle(backend, x, z, weight, eps, rel, norm=gated_rmsnorm, oracle=naive_gated_rmsnorm,
                         **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (x, z, weight)]
    with force_backend(backend):
        y = norm(*leaves, eps=eps, **kw)
    refs = [t.detach().to(torch.float64).requires_grad_() for t in (x, z, weight)]
    y_ref = oracle(*refs, eps=eps, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_ref, rel, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (y.float() * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for name, leaf, ref in zip(("dx", "dz", "dweight"), leaves, refs):
        assert leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad, ref.grad, rel, name)


# shape-eps: head dims 32/64/128, a D that is not a power of two, one row, many rows (the
# Triton backward's programs, three under the interpreter, then loop over several row blocks,
# the last one partial)
CASES = [
    ((4, 7, 32), 1e-6),
    ((7, 50, 64), 1e-6),
    ((3, 64), 1e-5),
    ((2, 5, 3, 48), 1e-6),
    ((1, 130), 1e-2),
    ((2, 33, 2, 128), 1e-6),
    ((5, 24), 1.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,eps", CASES, ids=[f"{'x'.join(map(str, c[0]))}-eps{c[1]:g}" for c in CASES])
def test_against_oracle(backend, shape, eps):
    check_against_oracle(backend, *make_inputs(shape, seed=len(shape)), eps, FP32_REL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_rows_are_eps_dominated(backend):
    """Rows far below sqrt(eps) are scaled by ~1/sqrt(eps), not normalised to unit RMS."""
    x, z, weight = make_inputs((6, 16), seed=3)
    check_against_oracle(backend, x * 1e-4, z, weight, 1e-2, FP32_REL)


def check_views_against_oracle(backend, make_views, bases, weight, rel):
    """make_views(*bases) -> (x, z) as views of the leaf tensors `bases`; forward and the
    gradients of the bases and the weight against the oracle on the same views in fp64."""
    leaves = [t.detach().clone().requires_grad_() for t in (*bases, weight)]
    x, z = make_views(*leaves[:-1])
    with force_backend(backend):
        y = gated_rmsnorm(x, z, leaves[-1])
    refs = [t.detach().double().requires_grad_() for t in (*bases, weight)]
    x_ref, z_ref = make_views(*refs[:-1])
    y_ref = naive_gated_rmsnorm(x_ref, z_ref, refs[-1])
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, rel, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
    (y * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for i, (leaf, ref) in enumerate(zip(leaves, refs)):
        assert_close(leaf.grad, ref.grad, rel, f"grad{i}")
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """x and z as slices of wider tensors (the gate z is a section of the fused projection)."""
    wide_x, wide_z, _ = make_inputs((3, 5, 96), seed=5)
    _, _, weight = make_inputs((3, 5, 32), seed=6)
    x, z = wide_x[..., 32:64], wide_z[..., 64:]
    assert not x.is_contiguous() and not z.is_contiguous()
    with force_backend(backend):
        y = gated_rmsnorm(x, z, weight)
    assert_close(y, naive_gated_rmsnorm(x.double(), z.double(), weight.double()), FP32_REL, "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_layout_views(backend):
    """The layer's views in [s, b, HV, V] order: x a transposed contiguous [b, s, HV, V]
    tensor, z a channel slice of the [s, b, width] projection; y comes out contiguous in
    [s, b, HV, V] and, on Triton, dx in x's transposed layout (no copy either side)."""
    s, b, hv, v = 7, 3, 2, 16
    o_bshv, _, weight = make_inputs((b, s, hv, v), seed=12)
    proj_sbw = torch.randn(s, b, 3 * hv * v + 5, generator=torch.Generator().manual_seed(13)).to(DEVICE)

    def views(o, proj):
        return o.transpose(0, 1), proj[..., hv * v + 5:2 * hv * v + 5].view(s, b, hv, v)

    x, y = check_views_against_oracle(backend, views, (o_bshv, proj_sbw), weight, FP32_REL)
    if backend == "triton":
        assert y.is_contiguous()
        x = o_bshv.clone().requires_grad_().transpose(0, 1)
        grads = []
        x.register_hook(grads.append)
        with force_backend(backend):
            gated_rmsnorm(x, views(o_bshv, proj_sbw)[1], weight).sum().backward()
        assert grads[0].stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmergeable_rows(backend):
    """Four leading dims that no stride merge brings down to three: the Triton path copies."""
    base, _, weight = make_inputs((2, 3, 4, 5, 16), seed=14)
    gate, _, _ = make_inputs((5, 4, 3, 2, 16), seed=15)

    def views(x, z):
        return x.permute(1, 0, 3, 2, 4), z.permute(2, 3, 0, 1, 4)

    check_views_against_oracle(backend, views, (base, gate), weight, FP32_REL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_fp16(backend, dtype):
    """Low-precision input (fp16; bf16 on a GPU, the interpreter mishandles it)."""
    # fp16 keeps 11 mantissa bits, more than bf16: for it the bf16 bound is a conservative one
    check_against_oracle(backend, *make_inputs((4, 9, 64), dtype=dtype, seed=7), 1e-6, BF16_REL)


def test_oracle_matches_torch_rms_norm():
    """The oracle against torch's own rms_norm times silu (independent code)."""
    x, z, weight = make_inputs((4, 3, 40), dtype=torch.float64, seed=9, device="cpu")
    expected = F.rms_norm(x, (40,), weight, eps=1e-5) * F.silu(z)
    assert_close(naive_gated_rmsnorm(x, z, weight, 1e-5), expected, FP32_REL, "y")


def test_errors():
    # CPU tensors (the torch path) on every machine: the argument checks come before the dispatch
    x, z, weight = make_inputs((2, 3, 8), device="cpu")
    with pytest.raises(ValueError, match="z must have"):
        gated_rmsnorm(x, z[..., :4], weight)
    with pytest.raises(ValueError, match="weight must be"):
        gated_rmsnorm(x, z, weight[:4])
    with pytest.raises(ValueError, match="eps"):
        gated_rmsnorm(x, z, weight, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        gated_rmsnorm(x, z, weight, eps=-1e-6)
    with pytest.raises(TypeError, match="x must be a floating"):
        gated_rmsnorm(x.to(torch.int64), z, weight)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        gated_rmsnorm(x, None, weight)
    with pytest.raises(ValueError, match="one device"):
        gated_rmsnorm(x, z, weight.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [128, 256], ids=["D128", "D256"])
def test_cuda_realistic(dtype, D):
    """Triton on the GPU at layer sizes (8K tokens x 32 value heads) against the fp64 torch
    path, which the CPU tests above tie to the oracle."""
    check_cuda_vs_fp64_torch(gated_rmsnorm, torch_gated_rmsnorm, (2, 4096, 32, D), dtype, 11)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tuned_backward(monkeypatch):
    """The backward's tuner on the GPU (the suite runs with MEGATRON_GDN_AUTOTUNE=0): every
    candidate timed, the pick's gradients against the fp64 torch path, GDN's norm and Mamba2's
    grouped one."""
    from megatron_gdn.kernels.gated_norm import torch_gate_then_rmsnorm

    monkeypatch.setattr(norm_module, "AUTOTUNE", True)
    monkeypatch.setattr(norm_module, "_BWD_TUNED", {})
    check_cuda_vs_fp64_torch(gated_rmsnorm, torch_gated_rmsnorm, (2, 1024, 6, 512), torch.bfloat16, 12)
    check_cuda_vs_fp64_torch(gate_then_rmsnorm, torch_gate_then_rmsnorm, (2, 512, 8 * 256),
                             torch.bfloat16, 13, groups=8)
    assert len(norm_module._BWD_TUNED) == 2
    assert all(c in norm_module.BWD_CONFIGS for c in norm_module._BWD_TUNED.values())


def check_cuda_vs_fp64_torch(norm, torch_norm, shape, dtype, seed, **kw):
    x, z, weight = make_inputs(shape, dtype=dtype, seed=seed, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (x, z, weight)]
    y = norm(*leaves, **kw)
    refs = [t.double().requires_grad_() for t in (x, z, weight)]
    y_ref = torch_norm(*refs, **kw)
    rel = FP32_REL if dtype == torch.float32 else BF16_REL
    assert_close(y, y_ref, rel, "y")
    dy = torch.randn_like(y)
    (y.float() * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for name, leaf, r in zip(("dx", "dz", "dweight"), leaves, refs):
        assert_close(leaf.grad, r.grad, rel, name)


# ------------------------------------------------------------ gate first, grouped (Mamba2's)
def naive_gate_then_rmsnorm(x, z, weight, groups, eps):
    """fp64, one group at a time: rmsnorm(x silu(z)) weight over each slice of the last dim."""
    u = x.double() * z.double() * torch.sigmoid(z.double())
    D = x.shape[-1] // groups
    outs = []
    for g in range(groups):
        ug = u[..., g * D:(g + 1) * D]
        rms = torch.sqrt((ug * ug).sum(-1, keepdim=True) / D + eps)
        outs.append(ug / rms * weight.double()[g * D:(g + 1) * D])
    return torch.cat(outs, -1)


# the last two: several row blocks per backward program with 8 groups (they divide the 64-row
# blocks), and one block per program with 3 groups (they do not)
GATE_FIRST_CASES = [((4, 7, 32), 1), ((3, 64), 4), ((2, 5, 3, 48), 2), ((1, 130), 1), ((2, 9, 256), 8),
                    ((2, 30, 128), 8), ((4, 40, 48), 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", GATE_FIRST_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-g{c[1]}" for c in GATE_FIRST_CASES])
def test_gate_then_rmsnorm_against_oracle(backend, shape, groups):
    check_against_oracle(backend, *make_inputs(shape, seed=len(shape) + groups), 1e-5, FP32_REL,
                         norm=gate_then_rmsnorm, oracle=naive_gate_then_rmsnorm, groups=groups)


@pytest.mark.parametrize("config", norm_module.BWD_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_every_backward_config(config, monkeypatch):
    """Each launch config the GPU backward may pick (one row block per program, or a few
    persistent programs per SM: three in all here) gives the oracle's gradients, for GDN's norm
    and for Mamba2's grouped gate-first one."""
    monkeypatch.setattr(norm_module, "BWD_PIN", config)
    check_against_oracle("triton", *make_inputs((7, 50, 64), seed=3), 1e-6, FP32_REL)
    check_against_oracle("triton", *make_inputs((2, 30, 128), seed=4), 1e-6, FP32_REL,
                         norm=gate_then_rmsnorm, oracle=naive_gate_then_rmsnorm, groups=8)


def test_backward_tuner_picks_the_fastest_once(monkeypatch, capsys):
    """The GPU backward's choice among BWD_CONFIGS, with a stand-in clock: each candidate timed
    with the sum of the dw partials it returns, the fastest kept per key and not timed again
    (reported, as Triton reports its autotuning, under TRITON_PRINT_AUTOTUNING=1); the fixed
    choice without autotuning (the persistent launch for grouped norms)."""
    monkeypatch.setattr(norm_module, "INTERPRET", False)
    monkeypatch.setattr(norm_module, "AUTOTUNE", True)
    monkeypatch.setattr(norm_module, "_BWD_TUNED", {})
    configs = norm_module.BWD_CONFIGS
    cost = {c: 10.0 - i for i, c in enumerate(configs)}
    cost[configs[2]] = 0.5
    launched, timed = [], []

    def launch(config):
        launched.append(config)
        return torch.ones(3, 4)

    def time_ms(fn):
        fn()
        timed.append(launched[-1])
        return cost[launched[-1]]

    key = (64, 1, 100, False, torch.float32, torch.device("cpu"))
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "1")
    assert norm_module._backward_config(key, launch, time_ms) == configs[2]
    assert timed == list(configs)
    report = capsys.readouterr().out
    assert f"gated norm backward tuned for {key[:-1]}" in report and str(configs[2]) in report
    assert norm_module._backward_config(key, launch, time_ms) == configs[2] and len(timed) == len(configs)
    monkeypatch.setattr(norm_module, "AUTOTUNE", False)
    assert norm_module._backward_config((64, 1) + key[2:], launch) == configs[0]
    assert norm_module._backward_config((64, 8) + key[2:], launch) == configs[-1]


def test_gate_then_rmsnorm_strided_gate_written_in_place():
    """The mixer's layout on the Triton path: z a transposed slice of a wider [s, b, C'] tensor,
    its gradient written through dz_into into the matching slice of another such tensor."""
    s, b, C, groups = 11, 2, 48, 3
    gen = torch.Generator().manual_seed(9)
    wide = torch.randn(s, b, C + 5, generator=gen).to(DEVICE)
    x = torch.randn(b, s, C, generator=gen).to(DEVICE).requires_grad_()
    weight = (1 + 0.3 * torch.randn(C, generator=gen)).to(DEVICE).requires_grad_()
    z_leaf = wide.clone().requires_grad_()
    grad_buf = torch.full_like(wide, float("nan"))
    with force_backend("triton"):
        y = gate_then_rmsnorm(x, z_leaf[..., 2:2 + C].transpose(0, 1), weight, groups,
                              dz_into=lambda: grad_buf[..., 2:2 + C].transpose(0, 1))
    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    (y * dy).sum().backward()
    refs = [t.detach().double().requires_grad_() for t in (x, wide[..., 2:2 + C].transpose(0, 1), weight)]
    y_ref = naive_gate_then_rmsnorm(*refs, groups=groups, eps=1e-6)
    (y_ref * dy.double()).sum().backward()
    assert_close(y, y_ref, FP32_REL, "y")
    assert_close(grad_buf[..., 2:2 + C].transpose(0, 1), refs[1].grad, FP32_REL, "dz in place")
    assert_close(x.grad, refs[0].grad, FP32_REL, "dx")
    assert_close(weight.grad, refs[2].grad, FP32_REL, "dweight")


def test_gate_then_rmsnorm_errors():
    x, z, weight = make_inputs((2, 3, 8), device="cpu")
    with pytest.raises(ValueError, match="groups must be a positive int dividing the last dim 8"):
        gate_then_rmsnorm(x, z, weight, groups=3)
    with pytest.raises(ValueError, match="weight must be"):
        gate_then_rmsnorm(x, z, weight[:4], groups=2)
    with pytest.raises(ValueError, match="z must have"):
        gate_then_rmsnorm(x, z[..., :4], weight)
    with pytest.raises(ValueError, match="eps"):
        gate_then_rmsnorm(x, z, weight, eps=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [1, 8], ids=["g1", "g8"])
def test_cuda_gate_then_rmsnorm_mamba2_dims(dtype, groups):
    """The gate-first kernel on the GPU at the Mamba2 1.3B mixer's norm (d_inner 4096, 8K
    tokens) against the fp64 torch path."""
    from megatron_gdn.kernels.gated_norm import torch_gate_then_rmsnorm

    check_cuda_vs_fp64_torch(gate_then_rmsnorm, torch_gate_then_rmsnorm, (2, 4096, 4096), dtype, 12,
                             groups=groups)
