"""Every Triton kernel of the package compiles for Hopper (sm_90) without a GPU, specialised as
its launcher specialises it (bf16 and fp32; conv widths 2 / 4 / 8, norm rows of 128 / 256 in
both norm orders, grouped weights),
under two Triton versions: the one installed here and the GPU
machines' (3.6.0, which scripts/test.sh installs beside the environment into
`<venv>/triton-gpu`). Versions differ in what they accept: 3.8 takes 64-bit block-pointer
offsets, 3.6 asserts on them, and the forward's Tm store failed to compile on every GPU launch
of 2026-11-27 while every CPU check passed.

Each variant runs in a child process (under TRITON_INTERPRET the kernels are interpreter
objects; the GPU variant puts its Triton first on PYTHONPATH).
"""
import os
import subprocess
import sys

import pytest

from device import DEVICE

GPU_TRITON = os.path.join(sys.prefix, "triton-gpu")
GPU_TRITON_VERSION = "3.6.0"

_SCRIPT = """
import triton
from hopper_compile import compile_for_hopper, pointer_types
from megatron_gdn.kernels.conv1d import conv
from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb, chunk_fwd as cf, gate, recurrent as rc
from megatron_gdn.kernels.gated_norm import norm
from megatron_gdn.kernels.ssd import chunk as ssd

print("triton", triton.__version__)
F32 = ("g", "beta", "a_log", "A_log", "dt_bias", "gc", "beta_out", "k_rstd", "q_rstd", "dg",
       "dbeta", "kscale", "h0", "ht", "dht", "dh0", "weight", "bias", "dw_part", "db_part", "rstd",
       "dkn", "dk_raw", "dg_part", "dbeta_part", "dA_part", "ddt_part", "vs", "dvs", "dsk",
       "ddsk")
# integer scalars (T, strides, row counts) compile as i32, floats as fp32: the rest are pointers
SCALARS = {"D", "NT", "NT_SEQ", "PAR_CLASS", "R", "R1", "R2", "T", "part_stride"}


def pointers(fn, dtype):
    # sx0, sdy1, stride_xt, scale: scalars too
    return pointer_types(fn, F32, dtype, skip=lambda n: n in SCALARS or n.startswith("s"))


def configs(fn):
    # the first config (the fixed one) and the widest: what launches can pick
    cs = getattr(fn, "configs", None)
    if not cs:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return list({str(c): c for c in (cs[0], max(cs, key=lambda c: c.kwargs.get("BV", 0)))}.values())


n = 0
def build(fn, consts, dtype="bf16", warps=None, floats=("scale", "eps")):
    global n
    for cfg in configs(fn) if warps is None else [triton.Config({}, num_warps=warps)]:
        compile_for_hopper(fn, pointers(fn, dtype), dict(consts, **cfg.kwargs), cfg.num_warps,
                           cfg.num_stages, floats=floats)
        n += 1


K, V = 128, 128
for dtype, half in (("bf16", True), ("fp32", False)):
    base = dict(H=2, HV=4, K=K, V=V, L2=True, IS_VARLEN=True, HAS_G=True)
    build(cf._prepare_kernel, dict(base, BKF=128, BK=128 if half else 64, BV=64, GATE_MODE=1,
                                   BETA_SIGMOID=True, HAS_DT_BIAS=True, STORE=True,
                                   HALF_DOTS=half, STORE_TM=True), dtype)
    build(cf._state_kernel, dict(base, BK=K, USE_H0=True, STORE_FINAL=True, HAS_U=True,
                                 SAVE_STATES=True), dtype)
    build(cf._output_kernel, dict(base, BK=K), dtype)
    for per_hv in (0, 1):  # one program per key head (its value heads in turn) / value head
        build(cb._bwd_prep_kernel, dict(base, BK=64, BV=64, HAS_TM=True, STORE_U=True,
                                        PER_HV=per_hv), dtype)
    for store_qdo in (True, False):  # qdo and the key decay / the key decay alone
        build(cb._bwd_qdo_kernel, dict(base, BK=K, STORE_QDO=store_qdo,
                                       **cb.qdo_config(K).kwargs), dtype,
              warps=cb.qdo_config(K).num_warps)
    for inline in (False, True):  # reading qdo back / forming it in the pass
        for prefetch in (False, True):
            build(cb._bwd_dh_kernel, dict(base, BK=K, USE_DHT=True, USE_H0=True,
                                         PREFETCH=prefetch, QDO_INLINE=inline), dtype)
    build(cb._bwd_grad_vq_kernel, dict(base, BK=K, BKC=64, LOOP_G=1), dtype)
    # dq's product in a second V loop (the configs above take it in the first)
    build(cb._bwd_grad_vq_kernel, dict(base, BK=K, BKC=64, LOOP_G=1, BV=64, SPLIT_DQ=1), dtype,
          warps=4)
    for bk in (K, K // 2):  # one block; key-column blocks
        build(cb._bwd_grad_k_kernel, dict(base, BK=bk, BV=64, LOOP_G=2 if bk == K else 1), dtype,
              warps=8)
    build(cb._l2norm_bwd_rows_kernel, dict(H=2, OH=4, K=K, BK=K), dtype, warps=4)
    build(gate._gate_act_kernel, dict(HV=6, HVP=8, BR=256, HAS_DT_BIAS=True), dtype, warps=4)
    for has_gate in (True, False):
        build(gate._gate_bwd_kernel, dict(HV=6, HVP=8, BR=256, HAS_GATE=has_gate, HAS_DT_BIAS=has_gate,
                                          BETA_SIGMOID=True), dtype, warps=4)
    build(rc._fused_recurrent_gdr_fwd_kernel,
          dict(H=2, HV=4, K=K, V=V, BK=K, BV=32, EVEN_KV=True, IS_VARLEN=True,
               USE_INITIAL_STATE=True, STORE_FINAL_STATE=True, USE_QK_L2NORM=True,
               USE_GATE_PARAMS=True, HAS_DT_BIAS=True, USE_BETA_SIGMOID=True), dtype, warps=4)
    s = dict(G=2, HV=4, N=128, P=64, BT=ssd.BT, BN=128, BP=64, IS_VARLEN=True)
    build(ssd._cumsum_kernel, dict(HV=4, BT=ssd.BT, BH=4, IS_VARLEN=True), dtype, warps=4)
    for BN, BP in ((128, 64), (32, 32)):  # whole tiles, and the split of few heads / sequences
        # v read as v * vs (the Mamba2 mixer's x * dt) in one of the two
        build(ssd._state_fwd_kernel, dict(s, BN=BN, BP=BP, USE_H0=True, STORE_FINAL=True, HAS_VS=BN == 32),
              dtype, warps=4)
        build(ssd._state_bwd_kernel, dict(s, BN=BN, BP=BP, USE_DHT=True, STORE_DH0=True), dtype, warps=4)
    for RB in (1, 2):  # value heads per program of the output and chunk backward launches
        # v read as x * dt and the skip D x, as the Mamba2 mixer calls them, in one of the two
        build(ssd._output_fwd_kernel, dict(s, RB=RB, HAS_VS=RB == 2, HAS_D=RB == 2), dtype, warps=4)
        build(ssd._chunk_bwd_kernel, dict(s, RB=RB, HAS_VS=RB == 2, HAS_D=RB == 2), dtype, warps=8)
    flags = dict(HAS_BIAS=True, SILU=True, HAS_H0=True, IS_VARLEN=True)
    BT, BD, warps = conv.FWD_CONFIG
    build(conv._conv_fwd_kernel, dict(W=4, BT=BT, BD=BD, **flags), dtype, warps=warps)
    L, R, BD, warps = conv.BWD_CONFIG
    for W in (2, 4, 8):
        build(conv._conv_bwd_kernel, dict(W=W, L=L, R=R, BD=BD, HAS_DHT=True, **flags), dtype,
              warps=warps)
    build(conv._conv_final_state_kernel, dict(W=4, BK=4, BD=128, HAS_H0=True, IS_VARLEN=True),
          dtype, warps=1)
    build(conv._conv_update_kernel, dict(W=4, BT=1, BD=128, BK=4, HAS_BIAS=True, SILU=True),
          dtype, warps=4)
    for D in (128, 256):
        # GDN's norm, and Mamba2's gate-first one with one and with eight groups
        modes = ((False, 1), (True, 1), (True, 8))
        BD, BR, warps = norm._block_rows(D)
        for gate_first, groups in modes:
            build(norm._gated_rmsnorm_fwd_kernel, dict(BR=BR, BD=BD, GATE_FIRST=gate_first, G=groups),
                  dtype, warps=warps)
        for _, values, warps, stages in norm.BWD_CONFIGS:
            BD, BR = norm._row_tile(D, values)
            for gate_first, groups in modes:
                build(norm._gated_rmsnorm_bwd_kernel,
                      dict(BR=BR, BD=BD, GATE_FIRST=gate_first, G=groups, STAGES=stages),
                      dtype, warps=warps)
print("compiled", n)
"""


def _variants():
    return [pytest.param(None, id="installed"),
            pytest.param(GPU_TRITON, id=f"gpu-triton-{GPU_TRITON_VERSION}")]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU runs the kernels themselves")
@pytest.mark.parametrize("triton_dir", _variants())
def test_every_kernel_compiles_for_hopper(triton_dir):
    if triton_dir is not None and not os.path.isdir(os.path.join(triton_dir, "triton")):
        pytest.skip(f"no Triton {GPU_TRITON_VERSION} at {triton_dir} (scripts/test.sh installs it)")
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [tests_dir, os.environ.get("PYTHONPATH", "")]
    if triton_dir is not None:
        path.insert(0, triton_dir)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(path))
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                            text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "compiled" in result.stdout, out[-4000:]
    if triton_dir is not None:
        assert f"triton {GPU_TRITON_VERSION}" in result.stdout, out[-2000:]
