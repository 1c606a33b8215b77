"""The forward step for `megatron.training.pretrain`: one micro-batch through the model and
its loss function.

The loss is the sum of per-token cross entropies under the loss mask, returned with the token
count, so Megatron averages over all tokens of the global batch (over micro-batches and the
data- and context-parallel ranks; with `--calculate-per-token-loss` also for the gradients).
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_gdn.training.data import get_batch

__all__ = ["forward_step", "loss_func"]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """output_tensor: per-token losses [b, s(/cp)]; loss_mask: same shape, fp32 0/1."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.detach().float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = get_batch(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])
