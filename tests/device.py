"""Where the tests put the tensors they hand to the Triton kernels.

With a GPU, DEVICE is CUDA: the "triton" backend runs the compiled kernels there, "torch" runs
the torch path on the same tensors. Without one, DEVICE is the CPU and tests/conftest.py sets
TRITON_INTERPRET=1, so "triton" runs the kernels under the Triton interpreter. On a GPU machine
the interpreter is off and the "triton" backend refuses CPU tensors, so a test that runs the
Triton kernels (forced backend or a direct call) builds its inputs on DEVICE; a test about the
CPU itself (the torch path on CPU tensors, dispatch) says so and keeps them there.

Random inputs are drawn on the CPU from a seeded torch.Generator and then moved with
`to_device`, so both machines see the same numbers. Oracles run in float64 on either device;
`tolerance.assert_close` compares on the CPU.
"""
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# the half-precision input dtypes a Triton test covers: the Triton interpreter mishandles bf16,
# so only a GPU runs it
HALF_DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def to_device(*tensors):
    """The tensors on DEVICE (None stays None): one tensor for one argument, else a tuple."""
    moved = tuple(None if t is None else t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved
