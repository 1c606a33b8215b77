"""Gated RMSNorm: the output norm of Gated DeltaNet, RMSNorm(o) * SiLU(z) per head.

Legend: R rows (all leading dims flattened), D normalised dim (the value head dim); the
Triton kernels index rows as [R0, R1, R2] with a stride per dim, so the layer's [s, b, HV, V]
views (a transposed recurrence output, the gate as a slice of the projection) are read and
the output written in place.

    y = x * rsqrt(mean(x^2) + eps) * weight * silu(z)
"""
import os
import time
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ..utils import check_same_device, grad_destination, use_triton
from ..utils.tuning import AUTOTUNE, INTERPRET
from .torch_ref import torch_gate_then_rmsnorm, torch_gated_rmsnorm

# the Triton kernels keep a whole row in registers
MAX_TRITON_DIM = 16384


@triton.jit
def _row_offsets(o_r64, R1, R2, s0, s1, s2):
    """Element offset of the rows o_r64 of a [R0, R1, R2, D] view with row strides s0, s1, s2
    (the row index splits as ((i0 R1) + i1) R2 + i2)."""
    i2 = o_r64 % R2
    i01 = o_r64 // R2
    return (i01 // R1) * s0 + (i01 % R1) * s1 + i2 * s2


@triton.jit
def _gated_rmsnorm_fwd_kernel(
    x, z, weight, y, rstd, R, D, R1, R2,
    sx0, sx1, sx2, sz0, sz1, sz2, sy0, sy1, sy2, eps,
    BR: tl.constexpr, BD: tl.constexpr, GATE_FIRST: tl.constexpr, G: tl.constexpr,
):
    """GATE_FIRST: y = rmsnorm(x silu(z)) w (Mamba2's order) instead of rmsnorm(x) w silu(z);
    G > 1: row r (rows of [..., G, D]) is group r % G, with its own D weights."""
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < R
    m_d = o_d < D
    m = m_r[:, None] & m_d[None, :]
    o_r64 = o_r.to(tl.int64)
    p_x = _row_offsets(o_r64, R1, R2, sx0, sx1, sx2)
    p_z = _row_offsets(o_r64, R1, R2, sz0, sz1, sz2)
    p_y = _row_offsets(o_r64, R1, R2, sy0, sy1, sy2)
    b_x = tl.load(x + p_x[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_z = tl.load(z + p_z[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_w = _row_weights(weight, o_r, o_d, m, D, G)
    if GATE_FIRST:
        b_u = b_x * (b_z * tl.sigmoid(b_z))
        b_rstd = 1. / tl.sqrt(tl.sum(b_u * b_u, axis=1) / D + eps)
        b_y = b_u * b_rstd[:, None] * b_w
    else:
        b_rstd = 1. / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
        b_y = b_x * b_rstd[:, None] * b_w * (b_z * tl.sigmoid(b_z))
    tl.store(y + p_y[:, None] + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, b_rstd, mask=m_r)


@triton.jit
def _gated_rmsnorm_bwd_kernel(
    x, z, weight, rstd, dy, dx, dz, dw_part, R, D, R1, R2,
    sx0, sx1, sx2, sz0, sz1, sz2, sdy0, sdy1, sdy2, sdx0, sdx1, sdx2, sdz0, sdz1, sdz2,
    BR: tl.constexpr, BD: tl.constexpr, GATE_FIRST: tl.constexpr, G: tl.constexpr,
    STAGES: tl.constexpr,
):
    """n = x rstd, s = silu(z): dz = dy n w silu'(z), dx = rstd (dn - n mean(dn n)) with
    dn = dy w s, and this program's partial of dw = sum_rows dy n s ([G, D] per program).
    GATE_FIRST (u = x s, n = u rstd): du = rstd (dn - n mean(dn n)) with dn = dy w, then
    dx = du s, dz = du x silu'(z), dw = sum_rows dy n.

    Persistent: program p takes the row blocks p, p + P, p + 2P, ... (P programs, a few per
    SM), the next blocks' loads in flight while one is computed (STAGES), and sums its rows'
    dw terms in registers: one dw partial per program instead of one per block. Row r is in group
    r % G; the rows of block i are i BR + [0, BR), which fall in the same groups as
    p BR + [0, BR) when G divides BR, or when every program takes one block (the launcher
    guarantees one of the two)."""
    i_p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    o_b = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # dw terms: summed over each block's rows at once into a [BD] vector with one group;
    # with G groups kept per row ([BR, BD]) and split by group at the end
    acc_dw = tl.zeros([BD], dtype=tl.float32)
    acc_rows = tl.zeros([BR, BD], dtype=tl.float32)
    for i_r in tl.range(i_p, tl.cdiv(R, BR), n_prog, num_stages=STAGES):
        o_r = i_r * BR + o_b
        m_r = o_r < R
        m = m_r[:, None] & m_d[None, :]
        o_r64 = o_r.to(tl.int64)
        p_x = _row_offsets(o_r64, R1, R2, sx0, sx1, sx2)
        p_z = _row_offsets(o_r64, R1, R2, sz0, sz1, sz2)
        p_dy = _row_offsets(o_r64, R1, R2, sdy0, sdy1, sdy2)
        p_dx = _row_offsets(o_r64, R1, R2, sdx0, sdx1, sdx2)
        p_dz = _row_offsets(o_r64, R1, R2, sdz0, sdz1, sdz2)
        b_x = tl.load(x + p_x[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
        b_z = tl.load(z + p_z[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
        b_dy = tl.load(dy + p_dy[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
        b_w = _row_weights(weight, o_r, o_d, m, D, G)
        b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.)
        b_sig = tl.sigmoid(b_z)
        b_s = b_z * b_sig
        b_ds = b_sig * (1. + b_z * (1. - b_sig))  # silu'(z)
        if GATE_FIRST:
            b_n = b_x * b_s * b_rstd[:, None]
            b_dn = b_dy * b_w
            b_du = b_rstd[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=1) / D)[:, None])
            b_dx = b_du * b_s
            b_dz = b_du * b_x * b_ds
            b_dwr = b_dy * b_n
        else:
            b_n = b_x * b_rstd[:, None]
            b_dn = b_dy * b_w * b_s
            b_dx = b_rstd[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=1) / D)[:, None])
            b_dz = b_dy * b_n * b_w * b_ds
            b_dwr = b_dy * b_n * b_s
        if G == 1:
            acc_dw += tl.sum(b_dwr, axis=0)
        else:
            acc_rows += b_dwr
        tl.store(dx + p_dx[:, None] + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
        tl.store(dz + p_dz[:, None] + o_d[None, :], b_dz.to(dz.dtype.element_ty), mask=m)
    p_dw = dw_part + i_p.to(tl.int64) * G * D + o_d
    if G == 1:
        tl.store(p_dw, acc_dw, mask=m_d)
    else:
        group = (i_p * BR + o_b) % G
        for i_g in tl.static_range(G):
            b_g = tl.sum(tl.where((group == i_g)[:, None], acc_rows, 0.), axis=0)
            tl.store(p_dw + i_g * D, b_g, mask=m_d)


@triton.jit
def _row_weights(weight, o_r, o_d, m, D, G: tl.constexpr):
    """The weights of each row as a [BR, BD] tile (G groups: row r uses weight[r % G])."""
    # one return (Triton types every return of a function alike, pruned branches included)
    if G == 1:
        b_w = tl.load(weight + o_d, mask=o_d < D, other=0.).to(tl.float32)[None, :]
    else:
        b_w = tl.load(weight + ((o_r % G) * D)[:, None] + o_d[None, :], mask=m, other=0.).to(tl.float32)
    return b_w


def _row_tile(D: int, values: int) -> tuple:
    """(BD, BR) of a row block: whole rows padded to BD, about `values` fp32 values."""
    BD = triton.next_power_of_2(D)
    return BD, max(1, min(64, values // BD))


def _block_rows(D: int) -> tuple:
    """(BD, BR, num_warps) of the forward: the whole row in one tile, ~4K fp32 values per
    program (16 registers a tile at 8 warps)."""
    BD, BR = _row_tile(D, 4096)
    return BD, BR, 8 if BD * BR >= 4096 else 4


# The backward's launch configs: (programs per SM, 0 for one row block per program; fp32
# values per row block, so rows per block = this / the padded row width; warps; pipelining
# stages of the persistent loop). Measured on an H100 (benchmarks/RESULTS.md): at the GDN 1.3B
# layer's norm (98,304 rows of 512, bf16) the tuner's pick in the model took 0.37 ms per call
# (two persistent programs per SM alone: 0.55), with a dw-partial row per block to sum; at
# Mamba2's grouped norm (8 groups) the persistent launch 0.51 ms, one block per program 3-5 ms.
# Sixteen programs per SM, unpipelined, sit between (a few blocks each, few partial rows). The
# backward times the candidates once per shape on a GPU (`_backward_config`);
# MEGATRON_GDN_AUTOTUNE=0 takes the first.
BWD_CONFIGS = (
    (0, 2048, 8, 1),
    (0, 4096, 8, 1),
    (0, 1024, 4, 1),
    (16, 4096, 8, 1),
    (4, 2048, 8, 2),
    (8, 1024, 4, 2),
    (2, 4096, 8, 3),
)
_TUNE_RUNS = 5
# under the interpreter: persistent programs, three in all (`_backward_programs`), so that the
# tests give each several row blocks, unevenly
INTERPRET_BWD_CONFIG = (2, 4096, 8, 3)
# a config to use instead of the tuned one (benchmarks/bench_norm_gemm.py sets it)
BWD_PIN = None
_BWD_TUNED = {}
_SM_COUNT = {}


def _backward_programs(n_blocks: int, BR: int, G: int, per_sm: int, device) -> int:
    """Programs of the backward launch: one per row block (per_sm = 0), or at most per_sm per SM
    (three in all under the interpreter), each looping over row blocks; one block each when G
    groups do not divide BR (the kernel's group of a row is then known from its one block).
    At least one (R = 0 launches nothing)."""
    if per_sm == 0 or (G > 1 and BR % G != 0):
        return max(n_blocks, 1)
    if INTERPRET or device.type != "cuda":
        cap = 3
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        cap = per_sm * _SM_COUNT[index]
    return max(1, min(n_blocks, cap))


def _cuda_ms(fn, runs: int = _TUNE_RUNS) -> float:
    """GPU time of `runs` calls of fn after one more, CUDA events."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _backward_config(key, launch, time_ms=None):
    """The backward config for `key` (D, G, R, ..., device): the pinned one; the interpreter's;
    the first (the last with groups) with MEGATRON_GDN_AUTOTUNE=0 or off the GPU; else the
    fastest of BWD_CONFIGS by `time_ms` (CUDA events by default) of `launch(config)` and the sum
    of the dw partials it returns, once per key (every launch writes all of dx, dz and its dw
    partials, so the timing runs leave nothing behind)."""
    if BWD_PIN is not None:
        return BWD_PIN
    if INTERPRET:
        return INTERPRET_BWD_CONFIG
    if not AUTOTUNE or (time_ms is None and key[-1].type != "cuda"):
        # grouped (Mamba2's norm): one block per program would sum a [blocks, G x D] buffer
        return BWD_CONFIGS[0] if key[1] == 1 else BWD_CONFIGS[-1]
    if key not in _BWD_TUNED:
        time_ms = time_ms or _cuda_ms
        start = time.perf_counter()
        # with the sum of the dw partials: one row per block is 25-100 MB at GDN 1.3B
        times = [time_ms(lambda c=config: launch(c).sum(0)) for config in BWD_CONFIGS]
        _BWD_TUNED[key] = BWD_CONFIGS[times.index(min(times))]
        if os.environ.get("TRITON_PRINT_AUTOTUNING") == "1":
            # beside Triton's own autotuning reports (a new shape's first-call breakdown)
            print(f"gated norm backward tuned for {key[:-1]} in {time.perf_counter() - start:.2f}s: "
                  f"{_BWD_TUNED[key]} of {len(BWD_CONFIGS)} (ms: "
                  f"{', '.join(f'{t:.3f}' for t in times)})", flush=True)
    return _BWD_TUNED[key]


def _row_layout(shape, tensors) -> tuple:
    """Sizes (R0, R1, R2) and each tensor's row strides (s0, s1, s2) for tensors of one shape
    [..., D] with unit stride along D: the leading dims, dropping size-1 dims and merging
    neighbours that are mergeable in every tensor, padded to three. None when more than three
    remain (the caller then copies)."""
    dims = [(n, [t.stride(i) for t in tensors]) for i, n in enumerate(shape[:-1]) if n != 1]
    merged = []
    for n, strides in dims:
        if merged and all(prev == s * n for prev, s in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * n, strides)
        else:
            merged.append((n, strides))
    if len(merged) > 3:
        return None
    merged = [(1, [0] * len(tensors))] * (3 - len(merged)) + merged
    sizes = tuple(n for n, _ in merged)
    strides = [tuple(st[j] for _, st in merged) for j in range(len(tensors))]
    return sizes, strides


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class GatedRMSNormFunction(torch.autograd.Function):
    """x, z, y, dy, dx, dz are read and written in place through their strides (rows over up
    to three leading dims with any strides): no layout copy around the norm. y is [..., D]
    contiguous in the shape given; dx follows x's memory layout when x is dense, so a
    transposed view of a contiguous x gets a gradient its producer takes without a copy."""

    @staticmethod
    def forward(ctx, x, z, weight, eps, dz_into=None, gate_first=False):
        # x, z: [..., D], or [..., G, D] with weight [G * D] (groups: rows of group r % G)
        D = x.shape[-1]
        G = weight.numel() // D
        x, z = _unit_last(x), _unit_last(z)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        layout = _row_layout(x.shape, (x, z, y))
        if layout is None:
            x, z = x.contiguous(), z.contiguous()
            layout = _row_layout(x.shape, (x, z, y))
        (_, R1, R2), (sx, sz, sy) = layout
        weight = weight.contiguous()
        R = x.numel() // D
        BD, BR, warps = _block_rows(D)
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        if R > 0:
            _gated_rmsnorm_fwd_kernel[(triton.cdiv(R, BR),)](
                x, z, weight, y, rstd, R, D, R1, R2, *sx, *sz, *sy, eps,
                BR=BR, BD=BD, GATE_FIRST=gate_first, G=G, num_warps=warps,
            )
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.dz_into = dz_into
        ctx.gate_first = gate_first
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, weight, rstd = ctx.saved_tensors
        D = x.shape[-1]
        G = weight.numel() // D
        R = rstd.shape[0]
        dy = _unit_last(dy)
        # empty_like keeps a dense input's strides (a transposed x gets a transposed dx)
        dx = torch.empty_like(x)
        dz = grad_destination(ctx.dz_into, z)
        if dz is None:
            dz = torch.empty_like(z)
        tensors = (x, z, dy, dx, dz)
        layout = _row_layout(x.shape, tensors)
        if layout is None:
            x, z, dy = x.contiguous(), z.contiguous(), dy.contiguous()
            dx, dz = torch.empty_like(x), torch.empty_like(z)
            tensors = (x, z, dy, dx, dz)
            layout = _row_layout(x.shape, tensors)
        (_, R1, R2), strides = layout
        if R == 0:
            return dx, dz, torch.zeros_like(weight), None, None, None

        def launch(config):
            per_sm, values, warps, stages = config
            BD, BR = _row_tile(D, values)
            n_prog = _backward_programs(triton.cdiv(R, BR), BR, G, per_sm, x.device)
            # every program writes its dw partial row (all G * D columns)
            dw_part = torch.empty(n_prog, G * D, dtype=torch.float32, device=x.device)
            _gated_rmsnorm_bwd_kernel[(n_prog,)](
                x, z, weight, rstd, dy, dx, dz, dw_part, R, D, R1, R2,
                *(s for st in strides for s in st),
                BR=BR, BD=BD, GATE_FIRST=ctx.gate_first, G=G, STAGES=stages,
                num_warps=warps,
            )
            return dw_part

        key = (D, G, R, ctx.gate_first, x.dtype, x.device)
        dw = launch(_backward_config(key, launch)).sum(0).to(weight.dtype)
        # eps, dz_into, gate_first: not differentiable
        return dx, dz, dw, None, None, None


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_norm_args(x, z, weight, eps, dim: str) -> int:
    """The checks both norms share; returns the last dim (named `dim` in the messages)."""
    for name, t in (("x", x), ("z", z), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., {dim}] with {dim} > 0, got {tuple(x.shape)}")
    if z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{dim}={n}], got {tuple(weight.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    check_same_device(x=x, z=z, weight=weight)
    return n


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                  dz_into: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """Gated RMS normalisation over the last dim.

    Args:
        x: [..., D]; z: same shape as x (the gate); weight: [D]; eps > 0 (python float).
        dz_into: a hint for the backward: a function, called once there, returning the tensor
            (z's shape and dtype, unit stride along D) the Triton backward writes z's gradient
            into (a slice of one gradient buffer for a fused projection's sections). The torch
            path, and a tensor that does not fit, ignore it.
    Returns:
        y: [..., D] in x's dtype; statistics and products are computed in fp32.
    Gradients flow to x, z and weight.
    """
    D = _check_norm_args(x, z, weight, eps, "D")
    if use_triton(x):
        if D > MAX_TRITON_DIM:
            raise ValueError(f"x's last dim D={D} exceeds {MAX_TRITON_DIM}, the largest row the Triton kernel holds")
        return GatedRMSNormFunction.apply(x, z, weight, float(eps), dz_into)
    return torch_gated_rmsnorm(x, z, weight, float(eps))


def gate_then_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int = 1,
                      eps: float = 1e-6, *,
                      dz_into: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """Mamba2's gated norm, the gate before the norm: u = x * silu(z), normalised over each of
    `groups` equal slices of the last dim, times weight.

    Args:
        x: [..., C]; z: same shape (the gate); weight: [C]; groups: divides C; eps > 0.
        dz_into: as in `gated_rmsnorm` (a tensor of z's shape for z's gradient).
    Returns:
        y: [..., C] in x's dtype; statistics and products in fp32.
    Gradients flow to x, z and weight.
    """
    C = _check_norm_args(x, z, weight, eps, "C")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or C % groups:
        raise ValueError(f"groups must be a positive int dividing the last dim {C}, got {groups!r}")
    D = C // groups
    if not use_triton(x):
        return torch_gate_then_rmsnorm(x, z, weight, groups, float(eps))
    if D > MAX_TRITON_DIM:
        raise ValueError(f"a group of D={D} channels exceeds {MAX_TRITON_DIM}, the largest row the Triton kernel holds")
    split = (lambda t: t.unflatten(-1, (groups, D))) if groups > 1 else (lambda t: t)  # noqa: E731
    into = (lambda: split(dz_into())) if dz_into is not None else None  # noqa: E731
    y = GatedRMSNormFunction.apply(split(x), split(z), weight, float(eps), into, True)
    return y.flatten(-2) if groups > 1 else y
