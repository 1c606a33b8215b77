"""Is the dh pass's narrow config (BV 16, 4 warps, key decay on the k operand) the same machine
code as at an earlier commit? Compiles `_bwd_dh_kernel` for sm_90 from this checkout and from
REV (git archive into a temporary folder), each in its own process, and diffs the PTX with
parameter indices, register names and debug sections normalised away.

    env -u TRITON_INTERPRET PYTHONPATH=.venv/triton-gpu python benchmarks/ptx_dh_vs_rev.py 0930ad8^

(Triton 3.6.0 from .venv/triton-gpu: the GPU machines' compiler.) Equal PTX assembles to equal
SASS with the same ptxas, so a GPU run at REV vouches for these configs.
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import re, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
from hopper_compile import compile_for_hopper
from megatron_gdn.kernels.gated_delta_rule import chunk_bwd as cb
ptr = {n: "*bf16" for n in ("k", "w", "dv", "dh", "q", "do")}
ptr.update({n: "*fp32" for n in ("g", "gc", "k_rstd", "q_rstd", "kscale", "dht", "dh0")},
           cu_seqlens="*i32", chunk_offsets="*i32")
# constants a version does not take are dropped (KSCALE: the stored key decay, REV's default)
consts = dict(H=16, HV=16, K=128, V=128, BK=128, BV=16, USE_DHT=True, USE_H0=True,
              IS_VARLEN=False, ROW_SCALE=False, PREFETCH=False, L2=True, HAS_G=True, KSCALE=True,
              QDO_INLINE=False)
for stages in (2, 1):
    ptx = compile_for_hopper(cb._bwd_dh_kernel, ptr, consts, 4, stages).asm["ptx"]
    print("=== stages", stages)
    print(ptx)
"""


def _normalised(text):
    out, keep = {}, None
    for line in text.splitlines():
        if line.startswith("=== stages"):
            keep = out.setdefault(int(line.split()[-1]), [])
            continue
        if keep is None or re.match(r"\s*(//|\.loc|\.file|\.b8|\.b16|\.b32|\.b64)|\s*$", line):
            continue
        if "debug" in line or "DW_" in line:
            continue
        keep.append(re.sub(r"%[a-z]+\d+", "%R", re.sub(r"_param_\d+", "_param_N", line)))
    return out


def _ptx(root):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ptx_cmp_")
    res = subprocess.run([sys.executable, "-c", _CHILD, root], capture_output=True, text=True,
                         env=env, cwd=tempfile.gettempdir())
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return _normalised(res.stdout)


def main():
    rev = sys.argv[1]
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=True)
        subprocess.run(["tar", "x", "-C", old], input=archive.stdout, check=True)
        a, b = _ptx(old), _ptx(ROOT)
    import difflib
    for stages in sorted(a):
        diff = [d for d in difflib.unified_diff(a[stages], b[stages], lineterm="", n=0)
                if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        print(f"stages {stages}: {len(a[stages])} / {len(b[stages])} PTX lines, "
              f"{len(diff)} differing after normalisation")
        for d in diff[:20]:
            print("   ", d)


if __name__ == "__main__":
    main()
