"""Causal attention, full or sliding-window, on FlashAttention-3's Hopper kernels (optional).

FlashAttention-3 (the `hopper/` part of Dao-AILab/flash-attention, package `flash_attn_3`,
module `flash_attn_interface`) has no wheel on PyPI. Either install it, or build the subset we
use with `scripts/build_fa3.sh` (bf16, head dim 128, sm_90a, causal / local / varlen; see its
header) and point `MGDN_FA3_DIR` at the folder it writes (default: `.fa3` in the repository,
used when it exists). Nothing here is needed on the CPU or without FA3: every caller falls back
to the other kernels of attention.py.

FA3's window: with `causal=True` and `window_size=(left, 0)`, query t keeps key j iff
t - left <= j <= t. attention.py's window w (w keys, the query's own included) is left = w - 1.
FA3 takes [B, T, H, D] with any batch / token / head strides (the last dim contiguous) and
grouped-query attention natively (H a multiple of G), so attention.py's [T, B, H, D] tensors go
in as permuted views, without copies or repeated K/V.

`fa3_attention(q, k, v, window, scale)`: q [B, T, H, D], k / v [B, Tk, G, D], Tk >= T: the
queries are the last T of the Tk positions (FA3 aligns the causal mask to the bottom right);
window None is full causal attention. `fa3_varlen_attention(q, k, v, cu_seqlens, window, scale)`: packed
documents, q [N, H, D], k / v [N, G, D], boundaries cu_seqlens (ints). `fa3_supported(q)`:
whether this machine runs them for these inputs: a CUDA Hopper device, bf16 / fp16, the module
imports, and one small call, forward and backward, dense and packed, matches the same attention
written in torch for q's dtype and head dim (a build without that
dtype or head dim, or an off-by-one in the window convention, falls back instead of training on
a wrong mask).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from megatron_gdn.hybrid.swa_cudnn import _rel

__all__ = ["fa3_attention", "fa3_varlen_attention", "fa3_supported", "fa3_status"]

_DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".fa3"


def _import_interface():
    """-> (module or None, why not). An installed flash_attn_interface first, then the build
    folder (MGDN_FA3_DIR, else the repository's .fa3)."""
    try:
        import flash_attn_interface  # noqa: F401 (an installed FA3)
        return flash_attn_interface, ""
    except Exception as e:  # noqa: BLE001 (absent, or a build whose import fails)
        first = f"{type(e).__name__}: {e}"
    folder = Path(os.environ.get("MGDN_FA3_DIR", _DEFAULT_DIR))
    if not (folder / "flash_attn_interface.py").is_file():
        return None, f"no installed flash_attn_interface ({first}) and no build in {folder}"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        import flash_attn_interface  # noqa: F811
        return flash_attn_interface, ""
    except Exception as e:  # noqa: BLE001
        return None, f"the build in {folder} does not import: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=1)
def _interface():
    """The two entry points we call, as a namespace (tests replace this function)."""
    module, why = _import_interface()
    if module is None:
        return SimpleNamespace(why=why, dense=None, varlen=None)
    return SimpleNamespace(why="", dense=module.flash_attn_func, varlen=module.flash_attn_varlen_func)


def _left(window: Optional[int]) -> int:
    return -1 if window is None else int(window) - 1


def _check_window(window: Optional[int]) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int],
                  scale: float) -> torch.Tensor:
    """See the module docstring; returns o [B, T, H, D] in q's dtype."""
    if (q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[1] < q.shape[1]
            or k.shape[3] != q.shape[3]):
        raise ValueError(f"expected q [B, T, H, D] and k, v [B, Tk >= T, G, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                         f"({k.shape[2]})")
    _check_window(window)
    fn = _interface().dense
    if fn is None:
        raise RuntimeError(f"FlashAttention-3 is not available: {_interface().why}")
    return fn(q, k, v, softmax_scale=float(scale), causal=True, window_size=(_left(window), 0))


def fa3_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: Sequence[int], window: Optional[int],
                         scale: float) -> torch.Tensor:
    """See the module docstring; returns o [N, H, D] in q's dtype."""
    if q.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"expected q [N, H, D] and k, v [N, G, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    cu = [int(c) for c in cu_seqlens]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the token count {q.shape[0]}, got "
                         f"{cu[:4]}{'...' if len(cu) > 4 else ''}")
    _check_window(window)
    fn = _interface().varlen
    if fn is None:
        raise RuntimeError(f"FlashAttention-3 is not available: {_interface().why}")
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    return fn(q, k, v, cu_t, cu_t, longest, longest, softmax_scale=float(scale), causal=True,
              window_size=(_left(window), 0))


_CHECK_FAILURES: dict = {}  # (device, dtype, head dim) -> why the check failed, for fa3_status


@functools.lru_cache(maxsize=None)
def _fa3_works(device_index: int, dtype: torch.dtype, head_dim: int) -> bool:
    """A windowed dense call with GQA, a packed call, and a call with more keys than queries
    (the last 56 queries against all keys, as under CP), forward and backward, against the
    same attention in torch: the window convention, the bottom-right alignment, the dtype and
    the head dim of the build, once per device, dtype and head dim."""
    try:
        dev = torch.device("cuda", device_index)
        gen = torch.Generator(device=dev).manual_seed(0)
        B, T, H, G, D, w = 2, 200, 4, 2, head_dim, 48  # T not a tile multiple; w inside it

        def rand(*shape):
            return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)

        q, k, v, do = rand(B, T, H, D), rand(B, T, G, D), rand(B, T, G, D), rand(B, T, H, D)
        cu = [0, 77, 200, 400]  # three documents over the B * T tokens, one crossing the rows
        errors = []
        with torch.enable_grad():  # the first use may come under no_grad
            for case in ("dense", "packed", "tail"):
                ins = [x.clone().requires_grad_() for x in (q, k, v)]
                d = do
                if case == "packed":
                    flat = [x.reshape(B * T, x.shape[2], D) for x in ins]
                    out = fa3_varlen_attention(*flat, cu, w, 0.125).view(B, T, H, D)
                elif case == "tail":
                    out = fa3_attention(ins[0][:, -56:], ins[1], ins[2], w, 0.125)
                    d = do[:, -56:]
                else:
                    out = fa3_attention(*ins, w, 0.125)
                grads = torch.autograd.grad(out, ins, d)
                ref_ins = [x.float().clone().requires_grad_() for x in (q, k, v)]
                ref = _reference(*ref_ins, w, 0.125, cu if case == "packed" else None)
                if case == "tail":
                    ref = ref[:, -56:]
                ref_grads = torch.autograd.grad(ref, ref_ins, d.float())
                errors += [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
        torch.cuda.synchronize(dev)
        if all(e < 2e-2 for e in errors):
            return True
        _CHECK_FAILURES[(device_index, dtype, head_dim)] = (
            "relative errors (out, dq, dk, dv: dense, packed, more keys) "
            + ", ".join(f"{e:.1e}" for e in errors))
    except Exception as e:  # noqa: BLE001 (any failure: use another backend)
        _CHECK_FAILURES[(device_index, dtype, head_dim)] = f"{type(e).__name__}: {str(e)[:300]}"
    return False


def _reference(q, k, v, window, scale, cu_seqlens=None):
    """The same attention in torch, q [B, T, H, D], k / v [B, T, G, D] (fp32): plain rows, or
    with cu_seqlens documents over the B * T tokens laid back to back."""
    from megatron_gdn.hybrid.swa_varlen import varlen_causal_attention

    B, T, H, D = q.shape
    rows = [x.reshape(B * T, x.shape[2], D) for x in (q, k, v)]
    cu = list(cu_seqlens) if cu_seqlens is not None else list(range(0, B * T + 1, T))
    return varlen_causal_attention(*rows, cu, window, scale, kernel="math").view(B, T, H, D)


def fa3_supported(q: torch.Tensor) -> bool:
    """Whether FA3 takes q's device, dtype and head dim (q's last dim) on this machine."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if _interface().dense is None:
        return False
    return _fa3_works(q.device.index if q.device.index is not None else torch.cuda.current_device(),
                      q.dtype, q.shape[-1])


def fa3_status() -> str:
    """One line for logs: where FA3 came from, or why it is not there."""
    iface = _interface()
    if iface.dense is None:
        return f"FlashAttention-3: not available ({iface.why})"
    line = f"FlashAttention-3: {sys.modules[iface.dense.__module__].__file__}"
    for (dev, dtype, head_dim), why in _CHECK_FAILURES.items():
        line += f"; its check failed on cuda:{dev} for {dtype} / head dim {head_dim}: {why}"
    return line
