"""The multi-process harness itself: results per rank, errors with the rank's traceback, timeouts.

These launches skip Megatron (enable_cpu=False) to stay cheap.
"""
import pytest
import torch

from megatron_gdn.testing.dist import DistributedTestError, run_distributed


def _rank_sum(scale):
    rank = torch.distributed.get_rank()
    value = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(value)
    return {"rank": rank, "world": torch.distributed.get_world_size(), "sum": value * scale}


def _fail_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    # rank 0 waits in a collective that rank 1 never joins: the harness must not hang
    torch.distributed.barrier()
    return "unreachable"


def _sleep_forever():
    import time

    time.sleep(3600)


@pytest.mark.parametrize("start_method", [None, "spawn"])
def test_results_come_back_per_rank(start_method):
    results = run_distributed(_rank_sum, world_size=2, args=(2.0,), enable_cpu=False, timeout=120,
                              start_method=start_method)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results)
    for r in results:
        assert torch.equal(r["sum"], torch.tensor([6.0]))


def test_rank_exception_is_raised_with_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_one, world_size=2, enable_cpu=False, timeout=120)
    message = str(info.value)
    assert "--- rank 1 ---" in message
    assert "ValueError: deliberate failure on rank one" in message
    assert "_fail_on_rank_one" in message


def test_timeout_kills_hanging_ranks():
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_sleep_forever, world_size=2, enable_cpu=False, timeout=5)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_rank_sum, world_size=bad)


@pytest.mark.parametrize("option, value", [("start_method", "fork"), ("backend", "mpi"),
                                           ("timeout", 0)])
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        run_distributed(_rank_sum, world_size=2, **{option: value})
