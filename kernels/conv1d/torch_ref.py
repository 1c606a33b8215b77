"""Short causal convolution in plain torch: the CPU path (autograd gives the gradients).

Legend: B batch, T tokens, D channels, W kernel width, N sequences (state rows), L extended
length (the tokens with each sequence's W-1 history rows in front of it).

Each sequence is laid out as [its W-1 history rows | its tokens]; a valid (unpadded)
convolution over that extended buffer gives every output from inputs of its own sequence only,
and the last W-1 rows of a sequence's extended segment are its final state (for a sequence
shorter than W-1 that is the tail of its history followed by its tokens).
"""
from typing import List, Optional, Tuple, Union

import torch


def _valid_conv(ext_bld: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                activation: Optional[str]) -> torch.Tensor:
    """ext_bld: [B, L, D] -> [B, L - W + 1, D], computed in ext_bld's dtype."""
    W = weight.shape[1]
    out_len = ext_bld.shape[1] - W + 1
    w_dw = weight.to(ext_bld.dtype)
    out = ext_bld[:, 0:out_len] * w_dw[:, 0]
    for j in range(1, W):
        out = out + ext_bld[:, j:j + out_len] * w_dw[:, j]
    if bias is not None:
        out = out + bias.to(ext_bld.dtype)
    if activation == "silu":
        out = torch.nn.functional.silu(out)
    return out


def torch_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Union[torch.Tensor, List[int]]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Arguments as `causal_conv1d` (already validated); cu_seqlens may also be a python list."""
    if isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = cu_seqlens.tolist()
    B, T, D = x.shape
    W = weight.shape[1]
    # fp32 compute for low-precision inputs; fp64 stays fp64 so the oracle comparison is exact
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_btd = x.to(acc)
    n_rows = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None:
        history_nwd = initial_state.to(acc).transpose(1, 2)
    else:
        history_nwd = x_btd.new_zeros(n_rows, W - 1, D)

    if cu_seqlens is None:
        ext_bld = torch.cat([history_nwd, x_btd], dim=1)
        y = _valid_conv(ext_bld, weight, bias, activation)
        final = ext_bld[:, T:] if output_final_state else None
    else:
        pieces = []
        for n in range(n_rows):
            pieces.append(history_nwd[n])
            pieces.append(x_btd[0, cu_seqlens[n]:cu_seqlens[n + 1]])
        ext_ld = torch.cat(pieces, dim=0)
        y_ext = _valid_conv(ext_ld[None], weight, bias, activation)[0]
        # token t of sequence n sits at ext row t + (n+1)(W-1); its window starts at t + n(W-1)
        seq_of_token = torch.repeat_interleave(
            torch.arange(n_rows), torch.tensor([cu_seqlens[n + 1] - cu_seqlens[n] for n in range(n_rows)])
        )
        index = (torch.arange(T) + seq_of_token * (W - 1)).to(x.device)
        y = y_ext.index_select(0, index)[None]
        final = None
        if output_final_state:
            ends = torch.tensor(cu_seqlens[1:]) + torch.arange(n_rows) * (W - 1)
            rows = (ends[:, None] + torch.arange(W - 1)[None, :]).reshape(-1).to(x.device)
            final = ext_ld.index_select(0, rows).view(n_rows, W - 1, D)
    final_state = final.transpose(1, 2).to(x.dtype).contiguous() if final is not None else None
    return y.to(x.dtype), final_state


def torch_causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = "silu",
) -> torch.Tensor:
    """Arguments as `causal_conv1d_update` (already validated; x is [B, T, D])."""
    T = x.shape[1]
    W = weight.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ext_bld = torch.cat([conv_state.to(acc).transpose(1, 2), x.to(acc)], dim=1)
    y = _valid_conv(ext_bld, weight, bias, activation)
    conv_state.copy_(ext_bld[:, T:T + W - 1].transpose(1, 2))
    return y.to(x.dtype)
