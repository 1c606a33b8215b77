"""The GPU recall study of benchmarks/QUALITY.md as one job queue: every (task, model, seed) run
of train_recall.py (then, for MQAR, the checkpoint re-scored with 64 pairs), several runs per GPU
at once (the models are ~7M parameters: one alone leaves a GPU mostly idle), within a time
budget, resumable, then the tables.

    python examples/eval/gpu_study.py --out runs/gpu_study                     # MQAR, seeds 0-2
    python examples/eval/gpu_study.py --out runs/gpu_study --study niah --seeds 0
    python examples/eval/gpu_study.py --out DIR --budget-s 480 --slots-per-gpu 4

Runs land in OUT/TASK/MODEL/sSEED (train_recall.py's --out); a run whose eval.json exists is
skipped, so a later call resumes. No new run starts after --budget-s; each run's training is
told to end by --budget-s + --grace-s - --eval-reserve-s (a run too slow for its steps
shortens its schedule: eval.json records steps_done); runs still going at --budget-s +
--grace-s are stopped (their folders have no eval.json and are rerun next time).
At the end OUT/TASK/summary.json and summary.md (examples/eval/summarize_recall.py) per task,
and OUT/queue.json (every run: slot, seconds, return code).

--gpus 0 runs on the CPU (one slot per --slots-per-gpu), with --steps / --eval-samples
overrides: what the tests use to check the queue.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "eval" / "configs"
ALL_MODELS = ["gdn", "deltanet", "mamba2", "attention", "gdn_h1", "gdn_h2",
              "gdn_no_conv", "gdn_no_gate", "gdn_hd64"]
NIAH_MODELS = CORE_MODELS = ["gdn", "deltanet", "mamba2", "attention", "gdn_h1", "gdn_h2"]
# the settings of QUALITY.md's commands, one budget for every model
STUDIES = {
    "mqar": dict(tasks=["mqar"], models=ALL_MODELS, seq=256, steps=4000, batch=64,
                 lengths=[256, 512, 1024, 2048], samples=512, num_kv=16, rescore_kv=64,
                 vocab=None, lrs=[1e-3]),
    # MQAR at a size the models can learn within a few minutes on one GPU: run 9's first call
    # (vocab 8192, 16 pairs, T 256, lr 1e-3) left every recurrent model at the loss of a
    # uniform guess over the 4,092 values after 2,400 steps. Here a vocabulary of 512 (252
    # keys, 252 values: each key seen ~4 times a step at batch 128; the small models are
    # launch-bound, so the larger batch costs little) and 8 pairs, every model at two learning
    # rates (the row reported for a model is its better one at the training length), the
    # checkpoints re-scored with 16 pairs (twice the trained count)
    "mqar512": dict(tasks=["mqar"], models=CORE_MODELS, seq=128, steps=1500, batch=128,
                    lengths=[128, 256, 512, 1024], samples=256, num_kv=8, rescore_kv=16,
                    vocab=512, lrs=[1e-3, 3e-3]),
    "niah": dict(tasks=["s_niah_1", "s_niah_2", "s_niah_3", "mk_niah_1"], models=NIAH_MODELS,
                 seq=512, steps=3000, batch=32, lengths=[512, 1024, 2048, 4096], samples=256,
                 num_kv=None, rescore_kv=None, vocab=None, lrs=[1e-3]),
}


def run_name(model: str, lr: float, lrs) -> str:
    """The run folder's model name: the config's, with the learning rate where the study has
    several."""
    return f"{model}-lr{lr:g}" if len(lrs) > 1 else model


def jobs_for(study: dict, seeds, models, out: Path, steps=None, samples=None, lengths=None,
             seq=None, batch=None, lrs=None):
    """[(name, run folder, [commands])] in priority order: seed-major, so a budget cut leaves
    whole seeds of every model rather than every seed of a few models."""
    py = sys.executable
    steps = steps or study["steps"]
    samples = samples or study["samples"]
    lengths = lengths or study["lengths"]
    seq = seq or study["seq"]
    batch = batch or study["batch"]
    kv = study["rescore_kv"]
    # run folders are named by the study's learning rates (an --lrs subset keeps the names)
    named = study["lrs"]
    lrs = lrs or study["lrs"]
    vocab = ["--vocab-size", str(study["vocab"])] if study["vocab"] else []
    # MQAR with n pairs needs 1 + 4n tokens: the re-scoring skips shorter lengths
    rescore_lengths = [str(n) for n in lengths if kv and n >= 1 + 4 * kv]
    lengths = [str(n) for n in lengths]
    jobs = []
    for seed in seeds:
        for task in study["tasks"]:
            for model, lr in [(m, lr) for m in models for lr in lrs]:
                run = out / task / run_name(model, lr, named) / f"s{seed}"
                task_args = ["--task", task] + (["--num-kv", str(study["num_kv"])]
                                                 if study["num_kv"] else [])
                train = [py, str(ROOT / "examples/eval/train_recall.py"),
                         "--config", str(CONFIGS / f"{model}.yaml"), *task_args,
                         "--seq-length", str(seq), "--steps", str(steps),
                         "--batch-size", str(batch), "--lr", f"{lr:g}", "--seed", str(seed), *vocab,
                         "--log-interval", str(max(1, steps // 40)), "--eval-lengths", *lengths,
                         "--eval-samples", str(samples), "--out", str(run)]
                cmds = [train]
                if rescore_lengths:
                    cmds.append([py, str(ROOT / "examples/eval/recall_eval.py"), "--checkpoint",
                                 str(run), "--num-kv", str(kv), "--lengths", *rescore_lengths,
                                 "--samples", str(samples), "--out", str(run / f"kv{kv}")])
                jobs.append((f"{task}/{run_name(model, lr, named)}/s{seed}", run, cmds))
    return jobs


def run_queue(jobs, slots, budget_s, grace_s, log_dir: Path, eval_reserve_s: float = 60.0):
    """Run the jobs on the slots (each slot: a CUDA_VISIBLE_DEVICES value, or None for the
    CPU); returns one record per job. Each training command is told the time it has
    (train_recall.py --time-limit-s: budget + grace - now - eval_reserve_s, 30 s at least),
    so that a run too slow for its steps shortens its schedule and still ends with a scored
    checkpoint instead of being stopped at budget + grace with nothing."""
    start = time.time()
    pending = [j for j in jobs if not (j[1] / "eval.json").exists()]
    records = [{"run": name, "skipped": "done before"} for name, run, _ in jobs
               if (run / "eval.json").exists()]
    free = list(range(len(slots)))
    running = []  # (proc, slot, name, run, remaining commands, t0, log)
    log_dir.mkdir(parents=True, exist_ok=True)

    def launch(slot, name, run, cmds, t0):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slots[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = slots[slot]
        run.parent.mkdir(parents=True, exist_ok=True)
        log = open(run.parent / f"{run.name}.log", "a")
        proc = subprocess.Popen(cmds[0], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        running.append((proc, slot, name, run, cmds[1:], t0, log))

    while pending or running:
        now = time.time() - start
        while pending and free and now < budget_s:
            name, run, cmds = pending.pop(0)
            limit = max(30.0, budget_s + grace_s - now - eval_reserve_s)
            cmds = [cmds[0] + ["--time-limit-s", f"{limit:.0f}"]] + cmds[1:]
            launch(free.pop(0), name, run, cmds, time.time())
        for item in list(running):
            proc, slot, name, run, rest, t0, log = item
            rc = proc.poll()
            if rc is None:
                if now > budget_s + grace_s:
                    proc.kill()
                    proc.wait()
                    rc = "killed at the budget"
                else:
                    continue
            running.remove(item)
            log.close()
            if rc == 0 and rest:  # the next command of the same run, on the same slot
                launch(slot, name, run, rest, t0)
                continue
            free.append(slot)
            records.append({"run": name, "slot": slots[slot], "rc": rc,
                            "seconds": round(time.time() - t0, 1)})
            print(json.dumps(records[-1]), flush=True)
        if not running and pending and now >= budget_s:
            records += [{"run": name, "skipped": "budget"} for name, _, _ in pending]
            pending = []
        time.sleep(0.5)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--study", choices=sorted(STUDIES), default="mqar")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=None, help="default: the study's list")
    p.add_argument("--gpus", type=int, default=None, help="default: every visible GPU; 0: the CPU")
    p.add_argument("--slots-per-gpu", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=480.0, help="no new run after this")
    p.add_argument("--grace-s", type=float, default=60.0, help="stop running ones after budget + this")
    p.add_argument("--eval-reserve-s", type=float, default=60.0,
                   help="what a run keeps of its time for scoring: its training is told to end by "
                        "budget + grace - this (train_recall.py --time-limit-s)")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="only these of the study's learning rates (e.g. more seeds at the better one)")
    p.add_argument("--steps", type=int, default=None, help="override the study's steps (tests)")
    p.add_argument("--eval-samples", type=int, default=None, help="override (tests)")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=None, help="override (tests)")
    p.add_argument("--seq-length", type=int, default=None, help="override (tests)")
    p.add_argument("--batch-size", type=int, default=None, help="override (tests)")
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    models = args.models or study["models"]
    unknown = [m for m in models if not (CONFIGS / f"{m}.yaml").exists()]
    if unknown:
        raise SystemExit(f"no config for {unknown} in {CONFIGS}")
    if args.gpus is None:
        import torch
        args.gpus = torch.cuda.device_count()
    slots = ([str(g) for g in range(args.gpus) for _ in range(args.slots_per_gpu)]
             if args.gpus > 0 else [None] * args.slots_per_gpu)
    if args.lrs and not set(args.lrs) <= set(study["lrs"]):
        raise SystemExit(f"--lrs {args.lrs}: the study {args.study!r} trains at {study['lrs']}")
    jobs = jobs_for(study, args.seeds, models, args.out, args.steps, args.eval_samples,
                    args.eval_lengths, args.seq_length, args.batch_size, args.lrs)
    print(f"{len(jobs)} runs on {len(slots)} slots ({args.gpus} GPUs), budget {args.budget_s:.0f} s",
          flush=True)
    records = run_queue(jobs, slots, args.budget_s, args.grace_s, args.out, args.eval_reserve_s)
    (args.out / "queue.json").write_text(json.dumps(records, indent=1))
    summarize = ROOT / "examples/eval/summarize_recall.py"
    kv = study["rescore_kv"]
    plots = []
    names = [run_name(m, lr, study["lrs"]) for m in models for lr in study["lrs"]]
    for task in study["tasks"]:
        root = args.out / task
        if not root.exists():
            continue
        # (evaluation subfolder, summary name, plot panel title): the trained pairs, and the
        # re-scoring with more pairs where the study has one
        panels = [("", "summary", task)] + ([(f"kv{kv}", f"summary_kv{kv}", f"{task}, {kv} pairs")]
                                            if kv else [])
        for sub, name, _ in panels:
            cmd = [sys.executable, str(summarize), str(root), "--models", *names,
                   "--out", str(root / f"{name}.json")]
            if sub:
                cmd += ["--eval-subdir", sub]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            (root / f"{name}.md").write_text(res.stdout + res.stderr)
            print(res.stdout[-3000:], flush=True)
        found = [(root / f"{name}.json", title) for _, name, title in panels
                 if (root / f"{name}.json").exists()]
        if found:
            plots.append((found, root / f"{task}.png"))
    # the plots where matplotlib is installed (the GPU image may not have it: plot_recall.py
    # makes them from the summaries on any machine)
    try:
        import matplotlib  # noqa: F401

        from plot_recall import plot
        for found, png in plots:
            print(plot([json.loads(f.read_text()) for f, _ in found], [t for _, t in found], png),
                  flush=True)
    except ImportError:
        print("matplotlib not installed: no plots (examples/eval/plot_recall.py makes them)")
    failed = [r for r in records if r.get("rc") not in (None, 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
