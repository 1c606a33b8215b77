"""Test-wide setup.

Without a GPU the Triton kernels run under the Triton interpreter; Triton reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
imports megatron_gdn.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# two cores: keep intra-op threads from oversubscribing when tests spawn processes
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
