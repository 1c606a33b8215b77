"""Datasets and micro-batches for `megatron.training.pretrain`.

`train_valid_test_datasets_provider` builds Megatron's GPTDataset over indexed data
(`--data-path`, `--train-data-path`/`--valid-data-path`/`--test-data-path`, `--split`) or
MockGPTDataset (`--mock-data`) through BlendedMegatronDatasetBuilder; pretrain builds the data
loader on tensor-parallel rank 0 only.

`get_batch` turns one loader sample into the model inputs: TP rank 0 reads it and broadcasts
tokens, labels, loss mask and positions to the other TP ranks; with context parallelism each
rank then keeps its two zigzag pieces of the sequence (Megatron's load-balanced layout).

Shapes: b = micro-batch size, s = sequence length (s / cp per rank with context parallelism).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ["train_valid_test_datasets_provider", "get_batch", "is_dataset_built_on_rank"]

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    """Datasets are needed where the loader runs: TP rank 0 of the first and last PP stages."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return False
    return (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            or parallel_state.is_pipeline_last_stage(ignore_virtual=True))


def _dataset_config(args, tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """(train, valid, test) datasets with the requested numbers of samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, get_tokenizer, print_rank_0

    args = get_args()
    config = _dataset_config(args, get_tokenizer())
    dataset_cls = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {dataset_cls.__name__} train/valid/test "
                 f"({list(train_val_test_num_samples)} samples)")
    return BlendedMegatronDatasetBuilder(
        dataset_cls, train_val_test_num_samples, lambda: is_dataset_built_on_rank(vp_stage), config
    ).build()


def _read_on_tp_rank0(data_iterator, micro_batch_size: int,
                      seq_length: int) -> Dict[str, torch.Tensor]:
    if data_iterator is not None:
        sample = next(data_iterator)
        return {
            "tokens": sample["tokens"].long().contiguous(),
            "labels": sample["labels"].long().contiguous(),
            "loss_mask": sample["loss_mask"].float().contiguous(),
            "position_ids": sample["position_ids"].long().contiguous(),
        }
    shape = (micro_batch_size, seq_length)
    return {
        "tokens": torch.empty(shape, dtype=torch.int64),
        "labels": torch.empty(shape, dtype=torch.int64),
        "loss_mask": torch.empty(shape, dtype=torch.float32),
        "position_ids": torch.empty(shape, dtype=torch.int64),
    }


def get_batch(data_iterator) -> Dict[str, torch.Tensor]:
    """tokens, labels, position_ids [b, s(/cp)] int64 and loss_mask [b, s(/cp)] fp32 on this
    rank's device, identical on all TP ranks."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank
    from megatron.training import get_args

    args = get_args()
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else None)
    batch = _read_on_tp_rank0(data_iterator, args.micro_batch_size, args.seq_length)
    if device is not None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        src = parallel_state.get_tensor_model_parallel_src_rank()
        group = parallel_state.get_tensor_model_parallel_group()
        for key in _KEYS:
            torch.distributed.broadcast(batch[key], src, group=group)
    if parallel_state.get_context_parallel_world_size() > 1:
        batch["cu_seqlens"] = None
        batch = get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group()
        )
        batch.pop("cu_seqlens", None)
    return batch


# Every rank calls the provider (pretrain would otherwise call it on TP rank 0 only): the
# builder's global barriers need all ranks, and `is_dataset_built_on_rank` decides who builds.
train_valid_test_datasets_provider.is_distributed = True
