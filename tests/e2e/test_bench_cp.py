"""benchmarks/bench_cp.py as the scale-out runs launch it, on the CPU (gloo, tiny dims,
`--smoke`): TP=2 x CP=2 on four processes. Its parity check (the CP stack against the same
weights and TP split without CP) must hold at the fp32 tolerance, and every length be timed."""
import json
import sys

from helpers import ROOT, check, run
from tolerance import FP32_REL


def test_bench_cp_tp2_cp2_smoke(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           str(ROOT / "benchmarks" / "bench_cp.py"), "--out", str(tmp_path), "--smoke", "--tp", "2"]
    check(run(cmd, timeout=300))
    record = json.loads((tmp_path / "bench_cp_tp2_cp2.json").read_text())
    assert (record["tp"], record["cp"]) == (2, 2)
    # outputs, the input gradient and every parameter of both layers (6 each)
    assert len(record["parity"]) == 2 + 2 * 6
    assert max(record["parity"].values()) <= FP32_REL, record["parity"]
    runs = record["runs"]
    assert [r["tokens"] for r in runs] == [64, 128] and all(r["ms"] > 0 for r in runs), runs
    # each rank's summaries over its CP group: its 2 of 4 value heads, independent of T
    assert runs[0]["bytes_fwd_per_layer"] == runs[1]["bytes_fwd_per_layer"] > 0


def test_bench_cp_rejects_a_tp_that_does_not_divide_the_world(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "benchmarks" / "bench_cp.py"), "--out", str(tmp_path), "--smoke", "--tp", "3"]
    proc = run(cmd, timeout=300)
    assert proc.returncode != 0
    assert "--tp 3 does not divide the world size 2" in proc.stderr + proc.stdout
