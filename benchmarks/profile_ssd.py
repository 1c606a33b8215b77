"""Our SSD kernel (Mamba2's chunked scalar-decay scan) launch by launch: where its forward and
backward time goes, at the shape of bench_ssd.py (64 heads of 64, state 128, one group).

    python benchmarks/profile_ssd.py --shapes 4x4096          # or via bench_ssd.py --stages

Forward: the chunk cumsum of g, the state pass (the state entering every chunk), the output.
Backward (what `kernels.ssd.chunk.ssd_bwd` runs): the state pass again, the reverse pass (dh),
the chunk-local gradients (dq / dk per block of value heads in fp32, dv, dg), and the sums of
dq / dk over a group's heads. Each launch is timed alone (median of CUDA-event timings) on the
tensors the previous ones produced, then the whole forward and forward+backward as
bench_ssd.py times them, so the parts can be set against the whole. Also runs on the CPU under
the Triton interpreter at a toy shape (`--smoke`: what the tests run; wall clock there).
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_generate import timed  # noqa: E402


def set_switches(heads=None, overlap=True, bwd_stages=None):
    """kernels/ssd/chunk.py's module switches for the next calls (None: the module's default):
    value heads per program of the output launch and the chunk backward, the backward's state
    passes on two streams, the chunk backward's pipelining stages."""
    from megatron_gdn.kernels.ssd import chunk as sc

    sc.MAX_HEADS_PER_PROGRAM = sc.DEFAULT_HEADS_PER_PROGRAM if heads is None else heads
    sc.OVERLAP_STREAMS = overlap
    sc.CHUNK_BWD_STAGES = sc.DEFAULT_CHUNK_BWD_STAGES if bwd_stages is None else bwd_stages


def ssd_stages(B: int, T: int, heads: int = 64, headdim: int = 64, state: int = 128,
               groups: int = 1, dtype=torch.bfloat16, iters: int = 20, warmup: int = 3,
               device: str = "cuda", heads_per_program=None) -> dict:
    """ms per launch of our SSD forward and backward, and the totals, at [B, T] tokens.
    heads_per_program: the cap on value heads per program of the output launch and the chunk
    backward (None: the default, MEGATRON_GDN_SSD_HEADS_PER_PROGRAM). Every other switch is
    set to its default here, whatever bench_ssd.py's rows left set."""
    from megatron_gdn.kernels.ssd import chunk as sc

    set_switches(heads_per_program)

    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    q = (rand(B, T, groups, state) / state ** 0.5).to(dtype)   # C
    k = (rand(B, T, groups, state) / state ** 0.5).to(dtype)   # B
    v = rand(B, T, heads, headdim).to(dtype)                   # x (read as x dt: vs)
    vs = torch.nn.functional.softplus(rand(B, T, heads) - 3.0)  # dt
    g = -vs * torch.exp(rand(heads) - 1.0)                     # dt A
    dsk = rand(heads, 1).expand(heads, headdim).contiguous()   # D (skip), per head
    do = rand(B, T, heads, headdim).to(dtype)
    scale = 1.0
    layout = sc.make_chunk_layout(None, B, T)
    gc = sc.ssd_cumsum(g, layout)
    h, _ = sc.ssd_state_fwd(k, v, gc, layout, None, False, vs=vs)
    dh, _ = sc.ssd_state_bwd(q, do, gc, h, None, False, scale, layout)
    dq_h, dk_h, _, _, _, _ = sc.ssd_chunk_bwd(q, k, v, gc, h, dh, do, scale, layout, vs, dsk)

    out = {"shape": [B, T, groups, heads, state, headdim], "dtype": str(dtype),
           "heads_per_program": sc._heads_per_program(heads // groups)}
    t = lambda fn: timed(fn, torch.device(device), iters, warmup)  # noqa: E731
    out["fwd_cumsum_ms"] = t(lambda: sc.ssd_cumsum(g, layout))
    out["fwd_state_ms"] = t(lambda: sc.ssd_state_fwd(k, v, gc, layout, None, False, vs=vs))
    out["fwd_output_ms"] = t(lambda: sc.ssd_output_fwd(q, k, v, gc, h, scale, layout, vs=vs, dsk=dsk))
    out["bwd_state_again_ms"] = out["fwd_state_ms"]
    out["bwd_dh_ms"] = t(lambda: sc.ssd_state_bwd(q, do, gc, h, None, False, scale, layout))
    # the two passes as the backward runs them: on two streams (and one after the other)
    for name, overlap in (("bwd_state_dh_overlap_ms", True), ("bwd_state_dh_in_line_ms", False)):
        out[name] = t(lambda o=overlap: sc.ssd_state_and_dh(q, k, v, gc, scale, None, do, None,
                                                            layout, overlap=o, vs=vs))
    out["bwd_chunk_ms"] = t(lambda: sc.ssd_chunk_bwd(q, k, v, gc, h, dh, do, scale, layout, vs, dsk))
    out["bwd_group_sums_ms"] = t(lambda: sc.ssd_group_sums(dq_h, dk_h, groups, q.dtype, k.dtype))
    out["fwd_parts_ms"] = out["fwd_cumsum_ms"] + out["fwd_state_ms"] + out["fwd_output_ms"]
    out["bwd_parts_ms"] = (out["bwd_state_again_ms"] + out["bwd_dh_ms"] + out["bwd_chunk_ms"]
                           + out["bwd_group_sums_ms"])
    # the whole calls (the kernel's own autograd Function, no mixer ops around it)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, vs, dsk[:, 0])]

    def forward():
        q_, k_, v_, g_, vs_, d_ = leaves
        return sc.chunk_scalar_decay_triton(q_, k_, v_, g_, scale, v_scale=vs_, d_skip=d_)[0]

    def forward_backward():
        forward().backward(do)

    with torch.no_grad():
        out["fwd_total_ms"] = t(forward)
    out["fwd_bwd_total_ms"] = t(forward_backward)
    # what the group sums move: dq_h and dk_h, fp32, read once (and the sums written)
    out["group_partials_mb"] = 2 * dq_h.numel() * 4 / 1e6
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4x4096,1x16384", help="comma-separated BxT")
    ap.add_argument("--out", default=None, help="write stages.json here")
    ap.add_argument("--smoke", action="store_true", help="toy shape on the CPU (Triton interpreter)")
    args = ap.parse_args()
    rows = []
    if args.smoke:
        rows.append(ssd_stages(1, 130, heads=4, headdim=16, state=16, dtype=torch.float32,
                               iters=1, warmup=0, device="cpu"))
    else:
        for shape in args.shapes.split(","):
            B, T = (int(x) for x in shape.split("x"))
            rows.append(ssd_stages(B, T))
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "stages.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
