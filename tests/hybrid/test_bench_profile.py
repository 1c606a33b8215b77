"""bench_hybrid.py's --profile: kernel names sorted into kinds, and the per-step tables written
(on the CPU the profiler records CPU ops; the GPU run records kernels)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_hybrid as bh  # noqa: E402


# kernel names as the profiler reports them (several from the GDN 1.3B profile on an H100)
KERNELS = [
    ("_bwd_grad_vq_kernel", "GDN chunk bwd"), ("_l2norm_bwd_rows_kernel", "GDN chunk bwd"),
    ("_gate_bwd_kernel", "GDN chunk bwd"), ("_gate_act_kernel", "GDN chunk bwd"),
    ("_prepare_kernel", "GDN chunk fwd"), ("_state_kernel", "GDN chunk fwd"),
    # the SSD's backward kernels are not the GDN's although they share the "_bwd_" fragment
    ("_state_bwd_kernel", "SSD (Mamba2)"), ("_conv_bwd_kernel", "conv1d"),
    ("_gated_rmsnorm_bwd_kernel", "gated norm"),
    ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NTN", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_64x3_tn_align2>", "gemm"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy / cat"),
    ("void at::native::vectorized_elementwise_kernel<4, ...>", "elementwise"),
    # inductor's kernels (Megatron's compiled SwiGLU) are not ours although they are Triton's
    ("triton_poi_fused_mul_silu_0", "torch.compile (Megatron's fusions)"),
    ("triton_red_fused_add_0", "torch.compile (Megatron's fusions)"),
    # "cat" inside another word is not a concatenation
    ("LinearWithGradAccumulationAndAsyncCommunication", "other"), ("something_else", "other"),
]


@pytest.mark.parametrize("name,kind", KERNELS)
def test_kinds_of_kernel_names(name, kind):
    assert bh.kind_of(name) == kind


def test_profile_tables(tmp_path):
    a = torch.randn(64, 64, requires_grad=True)

    def step():
        (a @ a).sum().backward()

    kinds = bh.profile_step(step, 2, tmp_path / "p.txt", "toy")
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("toy: ") and "| kind | ms per step | share |" in text
    assert "aten::mm" in text and kinds and all(v >= 0 for v in kinds.values())
