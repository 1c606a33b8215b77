"""`megatron_gdn.cpu.enable()`: idempotent, a no-op when CUDA is present, and what it patches.

The checks run in a fresh rank process (enable_cpu=False: the harness does not call enable()
there): enable() changes torch.cuda and the torch function mode stack of the process that
calls it, which must not leak into the rest of the test session.
"""
import torch

from megatron_gdn.testing.dist import run_distributed


class _FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _enable_report():
    import megatron_gdn.cpu as cpu

    report = {}
    real_is_available = torch.cuda.is_available
    real_current_device = torch.cuda.current_device
    modes_before = torch._C._len_torch_function_stack()

    # a CUDA machine: nothing may change
    torch.cuda.is_available = lambda: True
    report["cuda_enable"] = cpu.enable()
    report["cuda_is_enabled"] = cpu.is_enabled()
    report["cuda_current_device_untouched"] = torch.cuda.current_device is real_current_device
    report["cuda_modes_added"] = torch._C._len_torch_function_stack() - modes_before
    torch.cuda.is_available = real_is_available

    # no CUDA: patches applied once however often enable() is called
    report["first"] = cpu.enable()
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import torch_norm
    tracker_cls = mp_random.CudaRNGStatesTracker
    norm_new = torch_norm.WrappedTorchNorm.__new__
    all_reduce = torch.distributed.all_reduce
    modes = torch._C._len_torch_function_stack()
    report["second"] = cpu.enable()
    report["third"] = cpu.enable()
    report["modes_added"] = modes - modes_before
    report["modes_after_repeat"] = torch._C._len_torch_function_stack() - modes
    report["same_tracker_cls"] = mp_random.CudaRNGStatesTracker is tracker_cls
    report["same_norm_new"] = torch_norm.WrappedTorchNorm.__new__ is norm_new
    report["same_all_reduce"] = torch.distributed.all_reduce is all_reduce
    report["current_device"] = str(torch.cuda.current_device())
    report["cuda_tensor_device"] = str(torch.zeros(2, device="cuda").device)
    report["dot_cuda_device"] = str(torch.ones(1).cuda().device)
    report["grad_type"] = torch.ones(1).type()

    # rope's CP slice: rank r of W keeps pieces r and 2W-1-r of the sequence
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    emb = torch.arange(16.0).view(16, 1, 1, 1)
    report["rope_cp"] = [
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank(emb, 0, _FakeGroup(r, 2)).flatten().tolist()
        for r in range(2)
    ]
    return report


def test_enable_is_idempotent_and_noop_with_cuda():
    (report,) = run_distributed(_enable_report, world_size=1, enable_cpu=False, timeout=240)
    print(report)

    assert report["cuda_enable"] is False
    assert report["cuda_is_enabled"] is False
    assert report["cuda_current_device_untouched"] is True
    assert report["cuda_modes_added"] == 0

    if torch.cuda.is_available():
        # on a GPU machine the second half sees real CUDA: only the no-op half applies
        return
    assert report["first"] is True and report["second"] is True and report["third"] is True
    assert report["modes_added"] == 1
    assert report["modes_after_repeat"] == 0
    assert report["same_tracker_cls"] and report["same_norm_new"] and report["same_all_reduce"]
    assert report["current_device"] == "cpu"
    assert report["cuda_tensor_device"] == "cpu"
    assert report["dot_cuda_device"] == "cpu"
    assert report["grad_type"] == "torch.cuda.FloatTensor"
    assert report["rope_cp"] == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]


def _gloo_avg():
    rank = torch.distributed.get_rank()
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1)
    out = {}
    reduced = value.clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.AVG)
    out["all_reduce"] = reduced
    reduced = value.clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.AVG, async_op=True).wait()
    out["all_reduce_async"] = reduced
    shard = torch.empty(2)
    torch.distributed.reduce_scatter_tensor(shard, value, op=torch.distributed.ReduceOp.AVG)
    out["reduce_scatter"] = shard
    summed = value.clone()
    torch.distributed.all_reduce(summed)
    out["sum_untouched"] = summed
    return out


def test_gloo_average_ops():
    """gloo has no ReduceOp.AVG; enable() makes all_reduce / reduce_scatter_tensor take it."""
    results = run_distributed(_gloo_avg, world_size=2, timeout=120)
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for rank, out in enumerate(results):
        assert torch.equal(out["all_reduce"], base * 1.5)
        assert torch.equal(out["all_reduce_async"], base * 1.5)
        assert torch.equal(out["reduce_scatter"], (base * 1.5)[2 * rank:2 * rank + 2])
        assert torch.equal(out["sum_untouched"], base * 3)
