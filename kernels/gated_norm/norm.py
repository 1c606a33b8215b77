"""Gated RMSNorm: the output norm of Gated DeltaNet, RMSNorm(o) * SiLU(z) per head.

Legend: R rows (all leading dims flattened), D normalised dim (the value head dim).

    y = x * rsqrt(mean(x^2) + eps) * weight * silu(z)
"""
import torch
import triton
import triton.language as tl

from ..utils import check_same_device, use_triton
from .torch_ref import torch_gated_rmsnorm

# the Triton kernels keep a whole row in registers
MAX_TRITON_DIM = 16384


@triton.jit
def _gated_rmsnorm_fwd_kernel(
    x, z, weight, y, rstd, R, D, stride_x, stride_z, eps,
    BR: tl.constexpr, BD: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < R
    m_d = o_d < D
    m = m_r[:, None] & m_d[None, :]
    o_r64 = o_r.to(tl.int64)
    b_x = tl.load(x + o_r64[:, None] * stride_x + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_z = tl.load(z + o_r64[:, None] * stride_z + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_w = tl.load(weight + o_d, mask=m_d, other=0.).to(tl.float32)
    b_rstd = 1. / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_y = b_x * b_rstd[:, None] * b_w[None, :] * (b_z * tl.sigmoid(b_z))
    tl.store(y + o_r64[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, b_rstd, mask=m_r)


@triton.jit
def _gated_rmsnorm_bwd_kernel(
    x, z, weight, rstd, dy, dx, dz, dw_part, R, D, stride_x, stride_z,
    BR: tl.constexpr, BD: tl.constexpr,
):
    """n = x rstd, s = silu(z): dz = dy n w silu'(z), dx = rstd (dn - n mean(dn n)) with
    dn = dy w s, and this program's partial of dw = sum_rows dy n s."""
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < R
    m_d = o_d < D
    m = m_r[:, None] & m_d[None, :]
    o_r64 = o_r.to(tl.int64)
    b_x = tl.load(x + o_r64[:, None] * stride_x + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_z = tl.load(z + o_r64[:, None] * stride_z + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_dy = tl.load(dy + o_r64[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_w = tl.load(weight + o_d, mask=m_d, other=0.).to(tl.float32)
    b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.)
    b_n = b_x * b_rstd[:, None]
    b_sig = tl.sigmoid(b_z)
    b_s = b_z * b_sig
    b_dn = b_dy * b_w[None, :] * b_s
    b_dx = b_rstd[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=1) / D)[:, None])
    b_dz = b_dy * b_n * b_w[None, :] * b_sig * (1. + b_z * (1. - b_sig))
    tl.store(dx + o_r64[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
    tl.store(dz + o_r64[:, None] * D + o_d[None, :], b_dz.to(dz.dtype.element_ty), mask=m)
    tl.store(dw_part + i_r.to(tl.int64) * D + o_d, tl.sum(b_dy * b_n * b_s, axis=0), mask=m_d)


def _block_rows(D: int) -> tuple:
    """(BD, BR, num_warps): the whole row in one tile, ~4K fp32 values per program, so the
    backward's ~9 live tiles stay near 16 registers each at 8 warps."""
    BD = triton.next_power_of_2(D)
    BR = max(1, min(64, 4096 // BD))
    return BD, BR, 8 if BD * BR >= 4096 else 4


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """[..., D] -> [R, D] with unit stride along D (a view when possible)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class GatedRMSNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, z, weight, eps):
        D = x.shape[-1]
        x_rd, z_rd = _rows(x, D), _rows(z, D)
        weight = weight.contiguous()
        R = x_rd.shape[0]
        BD, BR, warps = _block_rows(D)
        y = torch.empty(R, D, dtype=x.dtype, device=x.device)
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        if R > 0:
            _gated_rmsnorm_fwd_kernel[(triton.cdiv(R, BR),)](
                x_rd, z_rd, weight, y, rstd, R, D, x_rd.stride(0), z_rd.stride(0), eps,
                BR=BR, BD=BD, num_warps=warps,
            )
        ctx.save_for_backward(x_rd, z_rd, weight, rstd)
        ctx.shape = x.shape
        ctx.z_dtype = z.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_rd, z_rd, weight, rstd = ctx.saved_tensors
        R, D = x_rd.shape
        BD, BR, warps = _block_rows(D)
        n_prog = triton.cdiv(R, BR)
        dy_rd = dy.reshape(R, D).contiguous()
        dx = torch.empty(R, D, dtype=x_rd.dtype, device=x_rd.device)
        dz = torch.empty(R, D, dtype=ctx.z_dtype, device=x_rd.device)
        dw_part = torch.zeros(max(n_prog, 1), D, dtype=torch.float32, device=x_rd.device)
        if R > 0:
            _gated_rmsnorm_bwd_kernel[(n_prog,)](
                x_rd, z_rd, weight, rstd, dy_rd, dx, dz, dw_part, R, D, x_rd.stride(0), z_rd.stride(0),
                BR=BR, BD=BD, num_warps=warps,
            )
        dw = dw_part.sum(0).to(weight.dtype)
        # eps: not differentiable
        return dx.view(ctx.shape), dz.view(ctx.shape), dw, None



_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gated RMS normalisation over the last dim.

    Args:
        x: [..., D]; z: same shape as x (the gate); weight: [D]; eps > 0 (python float).
    Returns:
        y: [..., D] in x's dtype; statistics and products are computed in fp32.
    Gradients flow to x, z and weight.
    """
    for name, t in (("x", x), ("z", z), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D > 0, got {tuple(x.shape)}")
    if z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D={D}], got {tuple(weight.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    check_same_device(x=x, z=z, weight=weight)

    if use_triton(x):
        if D > MAX_TRITON_DIM:
            raise ValueError(f"x's last dim D={D} exceeds {MAX_TRITON_DIM}, the largest row the Triton kernel holds")
        return GatedRMSNormFunction.apply(x, z, weight, float(eps))
    return torch_gated_rmsnorm(x, z, weight, float(eps))
