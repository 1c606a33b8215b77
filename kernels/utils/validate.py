"""Argument checks shared by the kernels' public functions: user errors are ValueError /
TypeError naming the argument."""
from typing import Optional

import torch


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int) -> None:
    """cu_seqlens: [N+1] int32/int64, 0 = c_0 <= c_1 <= ... <= c_N = T, with B == 1."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens (packed sequences) needs batch size 1, got B={batch}")
    c = cu_seqlens.detach().cpu()
    if int(c[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(c[0])}")
    if int(c[-1]) != total:
        raise ValueError(f"cu_seqlens must end at T={total}, got {int(c[-1])}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def prepare_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, total: int):
    """Returns (cu_seqlens as a python list or None, number of state rows N)."""
    if cu_seqlens is None:
        return None, batch
    check_cu_seqlens(cu_seqlens, batch, total)
    return cu_seqlens.detach().cpu().tolist(), cu_seqlens.numel() - 1


QKV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")


def check_linear_attention_inputs(q, k, v, per_token: dict, scale, initial_state, cu_seqlens,
                                  triton: bool, max_qk_dim: int, max_v_dim: int,
                                  letters=("H", "K", "V", "N"), extra_devices=None):
    """The checks every chunked linear-attention entry point shares: q, k [B, T, H, K], v
    [B, T, HV, V] with HV a multiple of H, the per-token tensors [B, T, HV] (`per_token`,
    name -> tensor), one q/k/v dtype, one device, cu_seqlens, the Triton head-dim limits,
    scale, and initial_state [N, HV, K, V] float32. `letters` names H, K, V and N in the
    messages (the SSD calls them G, N, P, NS). Returns (B, T, HV, number of state rows)."""
    h, kd, vd, rows = letters
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    for name, x in per_token.items():
        check_tensor(name, x, 3)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, {h}, {kd}] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, T, HV, {vd}] with B, T = {B}, {T} as in q, got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if T == 0 or H == 0 or K == 0 or HV == 0 or V == 0:
        raise ValueError(f"empty inputs: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if HV % H != 0:
        raise ValueError(f"v has HV={HV} value heads, which is not a multiple of {h}={H} heads of q/k")
    for name, x in per_token.items():
        if x.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(x.shape)}")
    allowed = QKV_DTYPES if triton else QKV_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        raise TypeError(f"q has dtype {q.dtype}; expected one of {', '.join(str(d) for d in allowed)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: q, k, v must share one dtype")
    check_same_device(q=q, k=k, v=v, initial_state=initial_state, **per_token, **(extra_devices or {}))
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        n_rows = cu_seqlens.numel() - 1
    else:
        n_rows = B
    if triton and K > max_qk_dim:
        raise ValueError(f"q/k head dim {kd}={K} exceeds the Triton kernels' limit {max_qk_dim}")
    if triton and V > max_v_dim:
        raise ValueError(f"v head dim {vd}={V} exceeds the Triton kernels' limit {max_v_dim}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a python float or None, got {type(scale).__name__}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4)
        if initial_state.shape != (n_rows, HV, K, V):
            raise ValueError(
                f"initial_state must be [{rows}, HV, {kd}, {vd}] = {(n_rows, HV, K, V)}, "
                f"got {tuple(initial_state.shape)}"
            )
        if initial_state.dtype not in state_dtypes(triton):
            raise TypeError(f"initial_state must be float32, got {initial_state.dtype}")
    return B, T, HV, n_rows


def state_dtypes(triton: bool):
    """fp32 states; the torch path also takes fp64 (the tests' float64 runs)."""
    return (torch.float32,) if triton else (torch.float32, torch.float64)


def grad_destination(into, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor a `*_into` gradient hint gives (`into()`, called once), if a gradient of
    `like` can be written into it: same shape, dtype and device, unit stride along the last dim
    (any other strides). None without a hint or when it does not fit: the caller allocates (a
    hint is only a hint)."""
    if into is None:
        return None
    dest = into()
    if (isinstance(dest, torch.Tensor) and dest.shape == like.shape and dest.dtype == like.dtype
            and dest.device == like.device and (dest.stride(-1) == 1 or dest.shape[-1] == 1)):
        return dest
    return None
