"""bench_hybrid.py's --profile: kernel names sorted into kinds, and the per-step tables written
(on the CPU the profiler records CPU ops; the GPU run records kernels)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_hybrid as bh  # noqa: E402


def test_kinds_of_kernel_names():
    assert bh.kind_of("_bwd_grad_vq_kernel") == "GDN chunk bwd"
    assert bh.kind_of("_l2norm_bwd_rows_kernel") == "GDN chunk bwd"
    assert bh.kind_of("_prepare_kernel") == "GDN chunk fwd"
    assert bh.kind_of("_state_kernel") == "GDN chunk fwd"
    # the SSD's backward kernels are not the GDN's although they share the "_bwd_" fragment
    assert bh.kind_of("_state_bwd_kernel") == "SSD (Mamba2)"
    assert bh.kind_of("_conv_bwd_kernel") == "conv1d"
    assert bh.kind_of("_gated_rmsnorm_bwd_kernel") == "gated norm"
    assert bh.kind_of("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert bh.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert bh.kind_of("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>") == "copy / cat"
    assert bh.kind_of("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise"
    # "cat" inside another word is not a concatenation
    assert bh.kind_of("LinearWithGradAccumulationAndAsyncCommunication") == "other"
    assert bh.kind_of("something_else") == "other"


def test_profile_tables(tmp_path):
    a = torch.randn(64, 64, requires_grad=True)

    def step():
        (a @ a).sum().backward()

    kinds = bh.profile_step(step, 2, tmp_path / "p.txt", "toy")
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("toy: ") and "| kind | ms per step | share |" in text
    assert "aten::mm" in text and kinds and all(v >= 0 for v in kinds.values())
