"""Test-wide setup.

Without a GPU the Triton kernels run under the Triton interpreter; Triton reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
imports megatron_gdn.kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# two cores: keep intra-op threads from oversubscribing when tests spawn processes
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _one_rank_collection():
    """A real one-rank gloo group in this process (Megatron's linears all-reduce over it),
    as the tensor- and context-parallel groups of a ProcessGroupCollection."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    group = dist.new_group([0])
    pg = ProcessGroupCollection()
    pg.tp = pg.cp = group
    return pg, created



@pytest.fixture(scope="module")
def one_rank_pg():
    """One-rank process groups for building a layer directly (see _one_rank_collection)."""
    import torch.distributed as dist

    pg, created = _one_rank_collection()
    yield pg
    if created:
        dist.destroy_process_group()


@pytest.fixture
def watch_split_sections(monkeypatch):
    """watch(module) -> list: the SectionGrads of every split_sections call made through
    `module` from then on (megatron_gdn/section_grads.py; their in-place / copied counts)."""

    def watch(module):
        seen, real = [], module.split_sections

        def recording(x, widths):
            views, grads = real(x, widths)
            seen.append(grads)
            return views, grads

        monkeypatch.setattr(module, "split_sections", recording)
        return seen

    return watch
