"""Where the time of one GatedDeltaNet layer forward+backward goes, kernel by kernel (torch
profiler, CUDA time), for the shapes of bench_layer.py. Guarded by tests/layer/ (correctness);
the totals here are per profiled step.

    python benchmarks/profile_layer.py --out DIR [--shape qwen3next] [--seq 4x4096]
"""
import argparse
import os

import torch

import bench_layer as bl


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="qwen3next", choices=list(bl.SHAPES))
    p.add_argument("--seq", default="4x4096", choices=list(bl.SEQS))
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bl.init_distributed(smoke=False)
    bl.init_megatron(1)
    hidden = bl.SHAPES[args.shape][0]
    b, s = bl.SEQS[args.seq]
    layer = bl.build_ours(bl.layer_config(bl.SHAPES[args.shape], torch.bfloat16))
    x = torch.randn(s, b, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(s, b, hidden, device="cuda", dtype=torch.bfloat16)

    def step():
        out, _ = layer(x)
        out.backward(dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    header = f"{args.shape} {args.seq}, {args.steps} steps, {torch.cuda.get_device_name(0)}"
    print(header)
    print(table)
    with open(os.path.join(args.out, f"profile_{args.shape}_{args.seq}.txt"), "w") as f:
        f.write(header + "\n" + table)


if __name__ == "__main__":
    main()
