"""Run the example's scripts as real processes and read what they wrote.

Every run uses the cpu-tiny preset shrunk to seconds: a 0.2 MB corpus, short sequences, a few
iterations. Warnings are silenced (Megatron prints dozens per start-up); the returned
`CompletedProcess` keeps stdout/stderr for failure messages.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "examples" / "pretrain_gdn.py"
PREPROCESS = ROOT / "examples" / "data" / "preprocess.py"
CORPUS = ROOT / "examples" / "data" / "build_corpus.py"

# shrinks the preset: 64-token sequences, 4 sequences per step, evaluation once
SHORT = ["--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "4",
         "--global-batch-size", "4", "--eval-interval", "1000", "--eval-iters", "1",
         "--log-interval", "1"]


def env(**extra):
    e = dict(os.environ)
    e.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MEGATRON_GDN_CORPUS_MB="0.2")
    e.pop("RANK", None)
    e.update(extra)
    return e


def run(cmd, timeout=300, **env_extra):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout)
    return proc


def check(proc):
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-4000:]}\n"
        f"--- stderr (tail)\n{proc.stderr[-6000:]}"
    )
    return proc


def pretrain(out, nproc, *flags, timeout=300):
    """pretrain_gdn.py --preset cpu-tiny --out OUT with `nproc` processes (torchrun)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    cmd = launcher + [str(PRETRAIN), "--preset", "cpu-tiny", "--out", str(out), *SHORT, *flags]
    return check(run(cmd, timeout=timeout))


def losses(out):
    """{iteration: lm loss} from OUT/metrics.jsonl."""
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in records}
