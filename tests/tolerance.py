"""The one tolerance helper of the test suite.

`assert_close(actual, expected, rel, name)` checks the relative RMS error
||actual - expected|| / ||expected|| (computed in float64) against `rel` and prints the max
absolute error and the relative RMS, so a failing or a passing run both show the margin.
"""
import math

import torch

# fp64 oracle vs an fp32 implementation: accumulated rounding of a few thousand ops
FP32_REL = 1e-5
# Triton's fp32 dot defaults to tf32 on GPUs; under the CPU interpreter it is exact fp32
TF32_REL = 5e-3
# bf16 inputs on the GPU (issue 2: relative error <= 1e-2)
BF16_REL = 1e-2


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "tensor") -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: non-finite values in result")
    err = rel_error(a, e)
    max_abs = (a - e).abs().max().item() if a.numel() else 0.0
    print(f"{name}: max_abs={max_abs:.3e} rel_rms={err:.3e} (tol {rel:.1e})")
    if not (err <= rel) or math.isnan(err):
        raise AssertionError(f"{name}: relative error {err:.3e} > {rel:.1e} (max abs {max_abs:.3e})")
    return err
