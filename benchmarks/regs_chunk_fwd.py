"""Registers, spills, shared memory and instruction mix of the forward's prepare kernels on
sm_90a, offline (no GPU): each compiled for Hopper as tests/hopper_compile.py does, its PTX run
through Triton's bundled `ptxas -v`, its SASS (cuobjdump) counted by instruction class. The
per-value-head `_prepare_kernel` (the per-key-head kernel it replaced took 207 registers at
K = V = 128, two blocks per SM), bf16, l2-norm and the fused gate on, at K = V = 128 and
K = 256 / V = 512, with its launcher's column blocks; the output kernel for reference.

    env -u TRITON_INTERPRET PYTHONPATH=. python benchmarks/regs_chunk_fwd.py

Correctness of these kernels: tests/kernels/test_chunk_internals.py and
tests/kernels/test_gated_delta_rule.py.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hopper_compile import HOPPER_MAX_SHARED, compile_for_hopper, shared_bytes  # noqa: E402

from megatron_gdn.kernels.gated_delta_rule import chunk_fwd as cf  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
FLOAT32 = ("g", "beta", "a_log", "dt_bias", "gc", "beta_out", "k_rstd", "q_rstd")
# SASS opcode prefixes counted: tensor-core MMAs (wgmma), shared-memory traffic, barriers,
# shuffles, special functions
CLASSES = (("HGMMA", "mma"), ("LDSM", "ldsm"), ("LDS", "lds"), ("STS", "sts"), ("BAR", "bar"),
           ("SHFL", "shfl"), ("MUFU", "mufu"))
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _sass_mix(cubin: bytes):
    """Static instruction counts by class, and `loops`: the instruction count of each loop
    body (a backward branch), in address order (the substitution loop runs 14 times)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    lines = [(int(a, 16), op, rest) for a, _, op, rest in _SASS_LINE.findall(text)]
    mix = collections.Counter()
    for _, op, _ in lines:
        for prefix, name in CLASSES:
            if op.split(".")[0] == prefix:
                mix[name] += 1
    mix["total"] = len(lines)
    loops = []
    for addr, op, rest in lines:
        target = re.match(r"\s*(0x[0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            loops.append(sum(1 for a, _, _ in lines if int(target.group(1), 16) <= a <= addr))
    mix["loops"] = loops
    return mix


def usage(fn, dtype, constexprs, num_warps):
    ptr = {n: f"*{dtype}" for n in ("q", "k", "v", "w", "u", "tm", "v_new", "h", "o")}
    ptr.update({n: "*fp32" for n in FLOAT32}, cu_seqlens="*i32", chunk_indices="*i32")
    kernel = compile_for_hopper(fn, ptr, constexprs, num_warps, 2, floats=("scale",))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", f.name,
                              "-o", os.devnull], capture_output=True, text=True,
                             check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stack, st, ld = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                       r"(\d+) bytes spill loads", out).groups())
    res = dict(regs=regs, stack=stack, spill_st=st, spill_ld=ld, shared=shared_bytes(kernel))
    try:
        res.update(_sass_mix(kernel.asm["cubin"]))
    except (OSError, subprocess.CalledProcessError):
        pass
    return res


def prepare_variants(K, V, dtype="bf16"):
    """(label, kernel, constexprs) as the launcher sets them."""
    half = dtype != "fp32"
    common = dict(H=16, HV=16, K=K, V=V, BKF=cf._pow2_block(K, 256), GATE_MODE=1,
                  BETA_SIGMOID=False, HAS_DT_BIAS=True, L2=True, STORE=True, IS_VARLEN=False,
                  STORE_TM=True)
    return [
        ("prepare", cf._prepare_kernel, dict(common, BK=cf._pow2_block(K, 128 if half and K <= 128 else 64),
                                             BV=cf._pow2_block(V, 128 if half and V <= 128 else 64),
                                             HALF_DOTS=half)),
    ]


def report(label, name, u):
    extra = " ".join(f"{c}={u[c]}" for c in ("total", "mma", "ldsm", "lds", "sts", "bar", "shfl",
                                             "mufu", "loops") if c in u)
    print(f"{label} {name:24s} regs={u['regs']} stack={u['stack']} spill_st={u['spill_st']} "
          f"spill_ld={u['spill_ld']} shared={u['shared']} (max {HOPPER_MAX_SHARED}) "
          f"sass: {extra}", flush=True)


def main():
    for K, V in ((128, 128), (256, 512)):
        for variant, fn, constexprs in prepare_variants(K, V):
            cfg = fn.configs[0]
            report(f"K={K} V={V} {variant}", fn.fn.__name__, usage(fn, "bf16", constexprs,
                                                                    cfg.num_warps))
        out = dict(H=16, HV=16, K=K, V=V, BK=cf._pow2_block(K, 256), BV=64, L2=True,
                   IS_VARLEN=False)
        report(f"K={K} V={V} ---", "_output_kernel", usage(cf._output_kernel, "bf16", out, 4))


if __name__ == "__main__":
    main()
