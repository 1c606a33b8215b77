"""Mamba2Mixer in one process: against a straightforward float64 Mamba2 block
(mamba2_reference.py), dense batch and packed sequences, forward and every parameter gradient;
MambaMixer's parameter names and shapes (a MambaMixer-shaped state dict loads, and
vice versa); the gated norm; construction errors; the spec."""
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module

from megatron_gdn.mamba2 import Mamba2Mixer, get_mamba2_mixer_spec, grouped_gated_rmsnorm
from mamba2_reference import reference_mamba2_block
from tolerance import FP32_REL, assert_close

HIDDEN, HEADDIM, STATE, GROUPS = 32, 16, 16, 2


@pytest.fixture(scope="module")
def pg1(one_rank_pg):
    """A real one-rank gloo group in this process (tests/conftest.py)."""
    return one_rank_pg


def _config(**kw):
    args = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
                mamba_state_dim=STATE, mamba_head_dim=HEADDIM, mamba_num_groups=GROUPS)
    args.update(kw)
    return TransformerConfig(**args)


def _build(pg, **params):
    torch.manual_seed(0)
    mixer = build_module(get_mamba2_mixer_spec(**params), config=_config(), layer_number=1, pg_collection=pg)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(0.5, 1.5)
    return mixer


# megatron-core 0.19.2 MambaMixer, d_model=32, expand=2, headdim=16, d_state=16, ngroups=2,
# d_conv=4, TP=1: names and shapes of its state dict (its constructor needs mamba_ssm and CUDA;
# the list is read off mamba_mixer.py: in_proj -> [z, x, B, C, dt], conv over [x, B, C])
def _mamba_mixer_shapes(d_model=HIDDEN, expand=2, headdim=HEADDIM, d_state=STATE, ngroups=GROUPS, d_conv=4):
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    return {
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d_weight": (conv_dim, 1, d_conv),
        "conv1d_bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


def test_state_dict_matches_mamba_mixer(pg1):
    mixer = _build(pg1)
    ours = {k: tuple(v.shape) for k, v in mixer.state_dict().items() if not k.endswith("_extra_state")}
    assert ours == _mamba_mixer_shapes()
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    # a MambaMixer-shaped state dict loads strictly and is used as is
    torch.manual_seed(3)
    foreign = {k: torch.randn(shape) for k, shape in _mamba_mixer_shapes().items()}
    missing, unexpected = mixer.load_state_dict(foreign, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    for k, v in foreign.items():
        assert torch.equal(mixer.state_dict()[k], v), k


def test_state_dict_source_matches_installed_megatron():
    """The names above are the ones the installed megatron-core MambaMixer registers."""
    import inspect

    from megatron.core.ssm import mamba_mixer

    src = inspect.getsource(mamba_mixer.MambaMixer.__init__)
    for name in ("self.in_proj", "self.conv1d_weight", "self.conv1d_bias", "self.dt_bias", "self.A_log",
                 "self.D", "self.norm", "self.out_proj"):
        assert f"{name} =" in src, name


def _params(mixer):
    return {k: v for k, v in mixer.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "thd"])
def test_mixer_vs_reference(pg1, packed):
    mixer = _build(pg1)
    gen = torch.Generator().manual_seed(5)
    if packed:
        cu = torch.tensor([0, 1, 40, 70, 90], dtype=torch.int32)
        x = torch.randn(90, 1, HIDDEN, generator=gen)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=39, max_seqlen_kv=39)
    else:
        cu, psp = None, None
        x = torch.randn(70, 2, HIDDEN, generator=gen)
    x.requires_grad_()
    out, bias = mixer(x, packed_seq_params=psp)
    assert bias is None
    dout = torch.randn(out.shape, generator=gen)
    params = _params(mixer)
    grads = torch.autograd.grad((out * dout).sum(), [x] + list(params.values()))

    ref_params = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    x64 = x.detach().double().requires_grad_()
    ref = reference_mamba2_block(x64, ref_params, headdim=HEADDIM, d_state=STATE, ngroups=GROUPS,
                                 cu_seqlens=cu)
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), [x64] + list(ref_params.values()))
    assert_close(out, ref, FP32_REL, "out")
    for name, a, b in zip(["x"] + list(params), grads, ref_grads):
        assert_close(a, b, FP32_REL, f"d{name}")


def test_mixer_triton_kernels_vs_reference(pg1, watch_split_sections):
    """The mixer on the Triton kernels (on DEVICE: the interpreter on a CPU machine), packed:
    the same float64 reference; in_proj's gradient was assembled in one buffer with the xBC
    and z sections written in place by the conv's and the norm's backward, dt copied in
    (section_grads.py)."""
    import megatron_gdn.mamba2 as mamba2_module
    from megatron_gdn.kernels.utils import force_backend
    from device import CUDA, DEVICE
    from tolerance import TF32_REL

    seen = watch_split_sections(mamba2_module)
    mixer = _build(pg1).to(DEVICE)
    gen = torch.Generator().manual_seed(6)
    cu = torch.tensor([0, 1, 40, 70], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.to(DEVICE), cu_seqlens_kv=cu.to(DEVICE),
                          max_seqlen_q=39, max_seqlen_kv=39)
    x = torch.randn(70, 1, HIDDEN, generator=gen).to(DEVICE).requires_grad_()
    with force_backend("triton"):
        out, _ = mixer(x, packed_seq_params=psp)
        dout = torch.randn(out.shape, generator=gen).to(DEVICE)
        params = _params(mixer)
        grads = torch.autograd.grad((out * dout).sum(), [x] + list(params.values()))
    ref_params = {k: v.detach().cpu().double().requires_grad_() for k, v in params.items()}
    x64 = x.detach().cpu().double().requires_grad_()
    ref = reference_mamba2_block(x64, ref_params, headdim=HEADDIM, d_state=STATE, ngroups=GROUPS,
                                 cu_seqlens=cu)
    ref_grads = torch.autograd.grad((ref * dout.cpu().double()).sum(), [x64] + list(ref_params.values()))
    rel = TF32_REL if CUDA else FP32_REL
    assert_close(out, ref, rel, "out")
    # dt_bias and A_log: per head, sums over every token of terms of both signs, formed on the
    # GPU from TF32 products (dv_scale = sum_p x dv); their error is measured against the size of
    # those terms (the same reference with the two given per token; an H100 gave 5.2e-3 and
    # 4.8e-3 of the sums' own norms, at tolerance 5e-3, with every other gradient <= 2.4e-5)
    sums = {}
    if CUDA:
        per_token = {k: ref_params[k].detach().expand(70, 1, -1).clone().requires_grad_()
                     for k in ("dt_bias", "A_log")}
        ref_tok = reference_mamba2_block(x64.detach(), {**ref_params, **per_token}, headdim=HEADDIM,
                                         d_state=STATE, ngroups=GROUPS, cu_seqlens=cu)
        terms = torch.autograd.grad((ref_tok * dout.cpu().double()).sum(), list(per_token.values()))
        for k, g in zip(per_token, terms):
            sums[k] = g.abs().sum((0, 1))
            torch.testing.assert_close(g.sum((0, 1)), ref_grads[1 + list(params).index(k)])
    failed = []  # every gradient checked and printed before the first failure is raised
    for name, a, b in zip(["x"] + list(params), grads, ref_grads):
        try:
            if name in sums:
                err = (a.detach().cpu().double() - b).norm().item() / sums[name].norm().item()
                print(f"d{name}: error {err:.3e} of its per-token terms' size (tol {rel:.1e})")
                assert err <= rel, f"d{name}: error {err:.3e} of its terms' size > {rel:.1e}"
            else:
                assert_close(a, b, rel, f"d{name}")
        except AssertionError as e:
            failed.append(str(e))
    assert not failed, "; ".join(failed)
    assert len(seen) == 1 and (seen[0].in_place, seen[0].copied) == (2, 1)


def test_grouped_gated_rmsnorm_groups():
    torch.manual_seed(0)
    y, z, w = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8)
    out = grouped_gated_rmsnorm(y, z, w, groups=2, eps=1e-5)
    u = (y * torch.nn.functional.silu(z)).view(3, 2, 4)
    expected = (u / (u.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).view(3, 8) * w
    assert_close(out, expected, FP32_REL, "norm")
    # one group normalises differently: groups matter
    assert (grouped_gated_rmsnorm(y, z, w, groups=1, eps=1e-5) - out).abs().max() > 1e-3


def test_errors_name_the_field(pg1):
    with pytest.raises(ValueError, match="num_groups=3"):
        build_module(get_mamba2_mixer_spec(num_groups=3), config=_config(), layer_number=1, pg_collection=pg1)
    with pytest.raises(ValueError, match="head_dim=24"):
        build_module(get_mamba2_mixer_spec(head_dim=24), config=_config(), layer_number=1, pg_collection=pg1)
    mixer = _build(pg1)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        mixer(torch.randn(6, 1, HIDDEN), packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5))


def test_init_independent_of_tp_layout(pg1):
    mixer = _build(pg1)
    A = torch.exp(mixer.A_log)
    assert bool(((A >= 1.0) & (A <= 16.0)).all())
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert bool(((dt >= 1e-4) & (dt <= 0.1 + 1e-6)).all())
