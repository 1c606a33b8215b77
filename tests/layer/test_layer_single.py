"""GatedDeltaNet in one process: against the plain float64 re-implementation
(tests/layer/layer_reference.py), padded batch and packed sequences, forward and every gradient;
against megatron-core's own GatedDeltaNet; init ranges; construction errors naming the field;
the specs.

Devices: the layer is built on the CPU (use_cpu_initialization). The torch-path checks and the
comparison with megatron-core's layer run on the CPU on every machine; the Triton-kernel checks
move the layer and its input to tests/device.py's DEVICE (the GPU when there is one, else the
CPU with the Triton interpreter); the training-builder model runs on DEVICE. The float64
reference always runs on the CPU."""
import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module, import_module

from megatron_gdn.kernels.utils import force_backend
from megatron_gdn.layer import GatedDeltaNet
from megatron_gdn.specs import get_gdn_layer_spec, get_gdn_mixer_spec
from device import CUDA, DEVICE
from layer_reference import reference_gdn_block
from tolerance import FP32_REL, TF32_REL, assert_close

HIDDEN, H, HV, K, V, W = 32, 2, 4, 16, 16, 4
# the Triton path: the chunk kernels' dots run in tf32 on a GPU, in exact fp32 under the interpreter
TRITON_REL = TF32_REL if CUDA else FP32_REL


class _FakeGroup:
    """Enough of a process group for the checks that run before any collective."""

    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def _pg(tp_group, cp_group):
    pg = ProcessGroupCollection()
    pg.tp = tp_group
    pg.cp = cp_group
    return pg


@pytest.fixture(scope="module")
def world1(one_rank_pg):
    """A real one-rank gloo group in this process (tests/conftest.py)."""
    return one_rank_pg


def _config(**overrides):
    kwargs = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
        linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=K,
        linear_value_head_dim=V, linear_conv_kernel_dim=W, layernorm_epsilon=1e-5,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _build(pg, config=None, **params):
    torch.manual_seed(0)
    layer = build_module(get_gdn_mixer_spec("local", **params), config=config or _config(),
                         layer_number=1, pg_collection=pg)
    with torch.no_grad():
        # make the norm weight and gates non-trivial so their gradients are checked in earnest
        layer.out_norm_weight.uniform_(0.5, 1.5)
    return layer


def _global_weights(layer):
    weights = {
        "in_proj": layer.in_proj.weight, "conv": layer.conv_weight, "A_log": layer.A_log,
        "dt_bias": layer.dt_bias, "norm": layer.out_norm_weight, "out_proj": layer.out_proj.weight,
    }
    return {name: w for name, w in weights.items() if w is not None}


def _check_against_reference(layer, x_sbh, packed_seq_params=None, cu_seqlens=None, rel=FP32_REL):
    """The layer on x_sbh's device (its parameters there too) against the float64 reference on
    the CPU: output, d hidden and every parameter gradient within `rel`."""
    options = dict(output_gate=layer.use_output_gate, short_conv=layer.use_short_conv, decay=layer.use_decay)
    x = x_sbh.clone().requires_grad_(True)
    out, bias = layer(x, None, packed_seq_params=packed_seq_params)
    assert bias is None
    # drawn on the CPU (the same numbers on every machine), then moved to the layer's device
    dout = torch.randn(out.shape, dtype=out.dtype).to(out.device)
    (out * dout).sum().backward()

    cpu = torch.device("cpu")
    ref_w = {n: p.detach().to(cpu, torch.float64).requires_grad_(True) for n, p in _global_weights(layer).items()}
    x_ref = x_sbh.detach().to(cpu, torch.float64).requires_grad_(True)
    ref_cu = None if cu_seqlens is None else cu_seqlens.to(cpu)
    ref = reference_gdn_block(x_ref, ref_w, H, HV, K, V, 1e-5, cu_seqlens=ref_cu, **options)
    (ref * dout.to(cpu, torch.float64)).sum().backward()

    assert_close(out, ref, rel, "output")
    assert_close(x.grad, x_ref.grad, rel, "d hidden")
    for name, param in _global_weights(layer).items():
        assert_close(param.grad, ref_w[name].grad, rel, f"d {name}")


def test_matches_reference_batch(world1):
    layer = _build(world1)
    torch.manual_seed(1)
    _check_against_reference(layer, torch.randn(37, 2, HIDDEN))


def test_matches_reference_triton_kernels(world1, watch_split_sections):
    """The layer on the Triton kernels (on DEVICE: compiled on a GPU, the interpreter on a CPU
    machine), batch 2: the path that reads the [s, b] projection through strided [b, s] views
    and writes the norm output in [s, b] order (the torch path copies where it must, so only
    this test checks those strides); the conv and norm backward kernels wrote the q, k, v and z
    sections of in_proj's gradient in place (megatron_gdn.section_grads), b and a were copied."""
    import megatron_gdn.layer as layer_module

    seen = watch_split_sections(layer_module)
    layer = _build(world1).to(DEVICE)
    torch.manual_seed(4)
    with force_backend("triton"):
        _check_against_reference(layer, torch.randn(21, 2, HIDDEN).to(DEVICE), rel=TRITON_REL)
    assert len(seen) == 1 and (seen[0].in_place, seen[0].copied) == (4, 2)


def test_matches_reference_packed(world1):
    layer = _build(world1)
    torch.manual_seed(2)
    # lengths 1 and 3 (<= W-1 taps of history) next to longer documents
    cu = torch.tensor([0, 1, 4, 22, 45], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=23, max_seqlen_kv=23)
    _check_against_reference(layer, torch.randn(45, 1, HIDDEN), packed_seq_params=psp, cu_seqlens=cu)


ABLATIONS = {"no_gate": dict(use_output_gate=False), "no_conv": dict(use_short_conv=False),
             "no_decay": dict(use_decay=False),
             "none": dict(use_output_gate=False, use_short_conv=False, use_decay=False)}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_options_match_reference(world1, name):
    """Each ablation option against the float64 reference without that piece (padded batch
    and packed sequences); the removed rows and parameters are really absent."""
    options = ABLATIONS[name]
    layer = _build(world1, **options)
    rows = 2 * H * K + HV * V + HV
    rows += HV * V if layer.use_output_gate else 0
    rows += HV if layer.use_decay else 0
    assert layer.in_proj.weight.shape == (rows, HIDDEN)
    assert (layer.conv_weight is None) == (not layer.use_short_conv)
    assert (layer.A_log is None and layer.dt_bias is None) == (not layer.use_decay)
    names = {n for n, _ in layer.named_parameters()}
    assert ("conv_weight" in names) == layer.use_short_conv and ("A_log" in names) == layer.use_decay
    torch.manual_seed(5)
    _check_against_reference(layer, torch.randn(19, 2, HIDDEN))
    cu = torch.tensor([0, 3, 20, 33], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=17, max_seqlen_kv=17)
    layer.zero_grad()
    _check_against_reference(layer, torch.randn(33, 1, HIDDEN), packed_seq_params=psp, cu_seqlens=cu)


def test_ablation_options_triton_kernels(world1):
    """All three options off on the Triton kernels (on DEVICE, as above): the SiLU-only q/k/v,
    the zero decay and the plain norm on that path."""
    layer = _build(world1, use_output_gate=False, use_short_conv=False, use_decay=False).to(DEVICE)
    torch.manual_seed(6)
    with force_backend("triton"):
        _check_against_reference(layer, torch.randn(21, 2, HIDDEN).to(DEVICE), rel=TRITON_REL)


def test_ablation_option_not_bool():
    pg = _pg(_FakeGroup(1), _FakeGroup(1))
    with pytest.raises(TypeError, match="use_decay"):
        GatedDeltaNet(_config(), get_gdn_mixer_spec("local").submodules, 1, pg, use_decay="no")
    with pytest.raises(ValueError, match="conv_bias"):
        GatedDeltaNet(_config(), get_gdn_mixer_spec("local").submodules, 1, pg, conv_bias=True,
                      use_short_conv=False)


def test_packed_documents_do_not_leak(world1):
    """The second document's output must not depend on the first one's tokens."""
    layer = _build(world1)
    torch.manual_seed(3)
    x = torch.randn(30, 1, HIDDEN)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=18, max_seqlen_kv=18)
    with torch.no_grad():
        packed, _ = layer(x, None, packed_seq_params=psp)
        alone, _ = layer(x[12:], None)
    assert_close(packed[12:], alone, FP32_REL, "second document")


def test_init_ranges(world1):
    layer = _build(world1)
    A = torch.exp(layer.A_log.detach())
    assert bool(((A >= 1.0) & (A <= 16.0)).all()), A
    dt = torch.nn.functional.softplus(layer.dt_bias.detach().double())
    assert bool(((dt >= 1e-3 - 1e-9) & (dt <= 0.1 + 1e-9)).all()), dt
    assert layer.conv_weight.shape == (2 * H * K + HV * V, W)
    assert float(layer.conv_weight.detach().abs().max()) <= 1.0 / math.sqrt(W)
    assert float(layer.conv_weight.detach().std()) > 0.1 / math.sqrt(W)
    fresh = build_module(get_gdn_mixer_spec("local"), config=_config(), layer_number=1, pg_collection=world1)
    assert torch.equal(fresh.out_norm_weight.detach(), torch.ones(V))
    for name in ("conv_weight", "A_log", "dt_bias"):
        param = getattr(layer, name)
        assert param.tensor_model_parallel and param.partition_dim == 0, name
    assert not getattr(layer.out_norm_weight, "tensor_model_parallel", False)


def test_inference_not_implemented(world1):
    layer = _build(world1)
    with pytest.raises(NotImplementedError, match="inference"):
        layer(torch.randn(4, 1, HIDDEN), None, inference_context=object())


@pytest.mark.parametrize(
    "overrides, tp, cp, field",
    [
        (dict(linear_num_key_heads=3, linear_num_value_heads=6), 2, 1, "linear_num_key_heads"),
        (dict(linear_num_key_heads=2, linear_num_value_heads=3), 1, 1, "linear_num_value_heads"),
        (dict(linear_num_key_heads=4, linear_num_value_heads=4), 8, 1, "linear_num_key_heads"),
        (dict(linear_key_head_dim=512), 1, 1, "linear_key_head_dim"),
        (dict(linear_value_head_dim=1024), 1, 1, "linear_value_head_dim"),
        (dict(linear_conv_kernel_dim=1), 1, 1, "linear_conv_kernel_dim"),
        (dict(linear_conv_kernel_dim=9), 1, 1, "linear_conv_kernel_dim"),
        (dict(linear_key_head_dim=0), 1, 1, "linear_key_head_dim"),
    ],
    ids=["H-not-div-tp", "HV-not-mult-H", "H-lt-tp", "K-too-big", "V-too-big", "conv-1", "conv-9",
         "K-zero"],
)
def test_bad_config_names_field(overrides, tp, cp, field):
    pg = _pg(_FakeGroup(tp), _FakeGroup(cp))
    with pytest.raises(ValueError, match=field):
        GatedDeltaNet(_config(**overrides), get_gdn_mixer_spec("local").submodules, 1, pg)


def test_bad_spec_params_name_field():
    pg = _pg(_FakeGroup(1), _FakeGroup(1))
    with pytest.raises(ValueError, match="A_init_range"):
        GatedDeltaNet(_config(), get_gdn_mixer_spec("local").submodules, 1, pg, A_init_range=(0.0, 16.0))
    with pytest.raises(ValueError, match="backend"):
        get_gdn_layer_spec("fused")


def test_specs():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    spec = import_module(("megatron_gdn.specs", "gdn_layer_spec"))
    assert isinstance(spec, ModuleSpec) and spec.module is TransformerLayer
    assert spec.submodules.self_attention.module is GatedDeltaNet
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="Transformer Engine"):
            get_gdn_layer_spec("te")
    else:
        te_spec = get_gdn_layer_spec("te")
        assert te_spec.submodules.self_attention.metainfo["fuse_input_layernorm"]


def _ours_vs_megatron_gdn():
    """Runs in a fresh process (megatron_gdn.cpu enabled): our layer and megatron-core 0.19.2's
    GatedDeltaNet with the same weights. Without fla, Megatron's layer runs its own torch
    paths (deterministic_mode: torch conv1d and torch chunked rule) with a torch l2norm.

    Both layers run on the CPU on every machine (ours on its torch path): an fp32 comparison
    of the block semantics, the same numbers with or without a GPU. Megatron's layer creates
    its conv, A_log and dt_bias on the current CUDA device whatever use_cpu_initialization
    says, so on a GPU machine it is moved to the CPU after the build."""
    import torch.nn.functional as F
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet as MegatronGDN
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules, common
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_gdn.testing.dist import destroy_megatron, init_megatron

    common.HAVE_FLA = True
    common.l2norm = lambda x: x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    init_megatron(tp=1)
    try:
        pg = ProcessGroupCollection.use_mpu_process_groups()
        config = _config(activation_func=F.silu, normalization="RMSNorm", deterministic_mode=True)
        ours = _build(pg, config)
        spec = ModuleSpec(module=MegatronGDN, submodules=GatedDeltaNetSubmodules(
            in_proj=ColumnParallelLinear, out_norm=WrappedTorchNorm, out_proj=RowParallelLinear))
        theirs = build_module(spec, config=config, layer_number=1, pg_collection=pg)
        cpu = torch.device("cpu")
        ours, theirs = ours.to(cpu), theirs.to(cpu)
        with torch.no_grad():
            theirs.in_proj.weight.copy_(ours.in_proj.weight)
            theirs.conv1d.weight.copy_(ours.conv_weight.unsqueeze(1))
            theirs.A_log.copy_(ours.A_log)
            theirs.dt_bias.copy_(ours.dt_bias)
            theirs.out_norm.weight.copy_(ours.out_norm_weight)
            theirs.out_proj.weight.copy_(ours.out_proj.weight)
        torch.manual_seed(5)
        x = torch.randn(40, 2, HIDDEN)
        dout = torch.randn(40, 2, HIDDEN)
        outs = []
        for layer in (ours, theirs):
            xi = x.clone().requires_grad_(True)
            out = layer(xi, None)[0]
            out.backward(dout)
            outs.append((out.detach(), xi.grad))
        grads = {
            "in_proj": (ours.in_proj.weight.grad, theirs.in_proj.weight.grad),
            "conv": (ours.conv_weight.grad, theirs.conv1d.weight.grad.squeeze(1)),
            "A_log": (ours.A_log.grad, theirs.A_log.grad),
            "dt_bias": (ours.dt_bias.grad, theirs.dt_bias.grad),
            "out_norm": (ours.out_norm_weight.grad, theirs.out_norm.weight.grad),
            "out_proj": (ours.out_proj.weight.grad, theirs.out_proj.weight.grad),
        }
        return outs, grads
    finally:
        destroy_megatron()


def _spec_through_training_builder():
    """`--spec megatron_gdn.specs gdn_layer_spec` as megatron.training resolves it: the
    attribute imported by name, handed to GPTModelBuilder as transformer_layer_spec. The model
    is built on the CPU and runs on DEVICE (a GPU machine runs Megatron's modules on CUDA)."""
    from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

    from megatron_gdn.testing.dist import destroy_megatron, init_megatron

    init_megatron(tp=1)
    try:
        spec = import_module(("megatron_gdn.specs", "gdn_layer_spec"))
        model_config = GPTModelConfig(transformer=_config(num_layers=2), transformer_layer_spec=spec,
                                      vocab_size=128, seq_length=16)
        model = GPTModelBuilder(model_config).build_model(ProcessGroupCollection.use_mpu_process_groups())
        model = model.to(DEVICE)
        mixers = [type(layer.self_attention).__name__ for layer in model.decoder.layers]
        tokens = torch.randint(0, 128, (2, 16)).to(DEVICE)
        logits = model(tokens, torch.arange(16).expand(2, 16).to(DEVICE), None)
        return mixers, tuple(logits.shape), bool(torch.isfinite(logits).all())
    finally:
        destroy_megatron()


def _one_process_checks():
    return {"megatron": _ours_vs_megatron_gdn(), "builder": _spec_through_training_builder()}


@pytest.fixture(scope="module")
def one_process():
    from megatron_gdn.testing.dist import run_distributed

    return run_distributed(_one_process_checks, world_size=1, timeout=300)[0]


def test_spec_through_megatron_training_builder(one_process):
    mixers, shape, finite = one_process["builder"]
    assert mixers == ["GatedDeltaNet", "GatedDeltaNet"]
    assert shape == (2, 16, 128) and finite


def test_matches_megatron_core_gdn(one_process):
    """Same block semantics as megatron-core's GatedDeltaNet (so its checkpoints map 1:1)."""
    outs, grads = one_process["megatron"]
    (out, dx), (ref_out, ref_dx) = outs
    assert_close(out, ref_out, FP32_REL, "output vs megatron")
    assert_close(dx, ref_dx, FP32_REL, "d hidden vs megatron")
    for name, (ours, theirs) in grads.items():
        assert_close(ours, theirs, FP32_REL, f"d {name} vs megatron")


def test_unset_linear_fields_fall_back_to_attention_sizes():
    from megatron_gdn.config import resolve_gdn_dims

    config = _config(linear_num_key_heads=None, linear_num_value_heads=None, linear_key_head_dim=None,
                     linear_value_head_dim=None, linear_conv_kernel_dim=None, kv_channels=8)
    dims = resolve_gdn_dims(config, tp_size=2)
    assert (dims.num_key_heads, dims.num_value_heads, dims.key_head_dim, dims.value_head_dim,
            dims.conv_kernel_dim) == (4, 4, 8, 8, 4)
    assert dims.in_proj_sections_local_tp == (16, 16, 16, 16, 2, 2)
    assert dims.in_proj_dim == 2 * 68
