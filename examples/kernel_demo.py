"""Kernel demo: the chunked gated delta rule, forward and backward, against the token recurrence.

    bash scripts/main.sh            # or: python examples/kernel_demo.py [--T 200 --dtype bf16]

Runs `chunk_gated_delta_rule` on random inputs with the backend for the device (pure torch on
a CPU, Triton on a GPU), checks the output, the final state and every gradient against the
token-by-token recurrence in float64, and prints the errors and timings.

Legend: B batch, T tokens, H key heads, HV value heads, K key dim, V value dim.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_gdn.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from megatron_gdn.kernels.utils import use_triton

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, device, reps):
    """Median wall time in ms of fn() over reps calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_rms(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--T", type=int, default=200)
    parser.add_argument("--H", type=int, default=2)
    parser.add_argument("--HV", type=int, default=4)
    parser.add_argument("--K", type=int, default=32)
    parser.add_argument("--V", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    B, T, H, HV, K, V = args.B, args.T, args.H, args.HV, args.K, args.V
    f64 = dict(dtype=torch.float64, device=device)
    leaves64 = {
        "q": torch.randn(B, T, H, K, **f64),
        "k": torch.randn(B, T, H, K, **f64),
        "v": torch.randn(B, T, HV, V, **f64),
        "a": torch.randn(B, T, HV, **f64),
        "b": torch.randn(B, T, HV, **f64),
        "initial_state": torch.randn(B, HV, K, V, **f64),
        "A_log": torch.empty(HV, **f64).uniform_(0.0, 2.7),
        "dt_bias": torch.empty(HV, **f64).uniform_(-6.0, -2.0),
    }
    # the implementation sees q/k/v in dtype, the rest in fp32; the reference the same values
    leaves = {
        n: t.to(dtype if n in ("q", "k", "v") else torch.float32).requires_grad_(True)
        for n, t in leaves64.items()
    }
    ref = {n: t.detach().double().requires_grad_(True) for n, t in leaves.items()}

    def run_chunk():
        return chunk_gated_delta_rule(
            leaves["q"], leaves["k"], leaves["v"], leaves["a"], leaves["b"],
            initial_state=leaves["initial_state"], output_final_state=True,
            use_qk_l2norm=True, A_log=leaves["A_log"], dt_bias=leaves["dt_bias"], use_beta_sigmoid=True,
        )

    def run_reference():
        q = ref["q"] * torch.rsqrt((ref["q"] ** 2).sum(-1, keepdim=True) + 1e-6)
        k = ref["k"] * torch.rsqrt((ref["k"] ** 2).sum(-1, keepdim=True) + 1e-6)
        g = -torch.exp(ref["A_log"]) * F.softplus(ref["a"] + ref["dt_bias"], threshold=20.0)
        beta = torch.sigmoid(ref["b"])
        return naive_recurrent_gated_delta_rule(q, k, ref["v"], g, beta, None, ref["initial_state"], True)

    w_o = torch.randn(B, T, HV, V, **f64)
    w_s = torch.randn(B, HV, K, V, **f64)

    def loss(o, s):
        return (o.double() * w_o).sum() + (s.double() * w_s).sum()

    backend = "triton" if use_triton(leaves["q"]) else "torch"
    print(f"device {device}, backend {backend}, dtype {args.dtype}, "
          f"B={B} T={T} H={H} HV={HV} K={K} V={V} (l2norm, A_log/dt_bias gate, beta sigmoid)")

    o, s = run_chunk()
    grads = torch.autograd.grad(loss(o, s), list(leaves.values()))
    t0 = time.perf_counter()
    o_ref, s_ref = run_reference()
    grads_ref = torch.autograd.grad(loss(o_ref, s_ref), list(ref.values()))
    naive_ms = (time.perf_counter() - t0) * 1e3

    print("relative RMS error vs the float64 recurrence:")
    print(f"  o              {rel_rms(o, o_ref):.2e}")
    print(f"  final_state    {rel_rms(s, s_ref):.2e}")
    for name, gr, gr_ref in zip(leaves, grads, grads_ref):
        print(f"  d{name:<14}{rel_rms(gr, gr_ref):.2e}")

    def fwd():
        with torch.no_grad():
            run_chunk()

    def fwd_bwd():
        o, s = run_chunk()
        torch.autograd.grad(loss(o, s), list(leaves.values()))

    print(f"chunk forward          {timed(fwd, device, args.reps):9.2f} ms")
    print(f"chunk forward+backward {timed(fwd_bwd, device, args.reps):9.2f} ms")
    print(f"naive fp64 fwd+bwd     {naive_ms:9.2f} ms (once)")


if __name__ == "__main__":
    main()
