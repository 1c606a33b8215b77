"""Registers, spills and shared memory of the SSD (Mamba2) kernels on sm_90a, offline (no GPU),
at the Mamba2 1.3B shape (one group, 64 value heads of P = 64, state N = 128), bf16, as the
launchers in kernels/ssd/chunk.py configure them.

    env -u TRITON_INTERPRET PYTHONPATH=<GPU triton>:. python benchmarks/regs_ssd.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hopper_compile import compile_for_hopper, pointer_types, ptxas_usage  # noqa: E402

from megatron_gdn.kernels.ssd import chunk as ssd  # noqa: E402

F32 = ("gc", "g", "h0", "ht", "dht", "dh0", "dq", "dk", "dg", "vs", "dvs", "dsk", "ddsk")  # h, dh: the inputs' dtype
SCALARS = {"T", "NT_SEQ"}


def usage(fn, constexprs, num_warps, dtype="bf16"):
    ptr = pointer_types(fn, F32, dtype,
                        skip=lambda n: n in SCALARS or n == "scale" or n in constexprs)
    return ptxas_usage(compile_for_hopper(fn, ptr, constexprs, num_warps, 1, floats=("scale",)))


def main():
    for name, constexprs, warps in ssd.launch_configs(G=1, HV=64, N=128, P=64, B=1, T=16384):
        u = usage(getattr(ssd, name), constexprs, warps)
        shown = {k: v for k, v in constexprs.items() if k.startswith("B") or k == "RB"}
        print(f"{name:20s} {shown} warps={warps} regs={u['regs']} stack={u['stack']} "
              f"spill_st={u['spill_st']} spill_ld={u['spill_ld']} shared={u['shared']}", flush=True)


if __name__ == "__main__":
    main()
