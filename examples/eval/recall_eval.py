"""Accuracy per sequence length on the synthetic recall tasks, for a trained model or a reference.

    python examples/eval/recall_eval.py --predictor oracle --task mqar --lengths 64 128 256 --out runs/eval_oracle
    python examples/eval/recall_eval.py --checkpoint runs/mqar_gdn --lengths 64 128 256 512 --out runs/mqar_gdn/eval

A predictor maps tokens [N, T] to predicted next tokens [N, T] (position t predicts token t + 1);
it is scored at the answer positions only (recall_tasks: labels != IGNORE):
- token accuracy: right answer tokens / answer tokens;
- exact match: samples whose every answer token is right (teacher-forced, which is what greedy
  decoding of the answer produces).

References: `oracle` solves each task from the tokens alone (it never reads the labels, so its
100% also checks the generators' answers); `random` guesses uniformly among the task's answer
ids (its accuracy is the chance level 1 / len(answer_vocab)). `--checkpoint DIR` scores a model
written by train_recall.py. Writes DIR/eval.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recall_tasks import (BLANK, IS, KEY_LEN, NEEDLE, PAD, QUERY, SEP, IGNORE, RecallBatch,  # noqa: E402
                          make_task, NIAH_PRESETS, TASKS)

__all__ = ["oracle", "random_guesser", "score", "evaluate_lengths", "eval_seed", "format_table"]

Predictor = Callable[[RecallBatch], np.ndarray]


def eval_seed(seed: int, length: int) -> int:
    """Evaluation batches use odd seeds, training batches (train_recall.train_seed) even ones,
    so no evaluation sample is drawn from a training seed."""
    return 2 * (seed * 1_000_003 + length) + 1


# ----------------------------------------------------------------------------- references
def _oracle_mqar(row, pred):
    # the sequence is BOS, then "key value" pairs and PAD singles: a key seen before is a
    # query (predict its value), a new one is stored with the value after it
    seen, t = {}, 1
    while t < len(row) - 1:
        tok = int(row[t])
        if tok == PAD:
            t += 1
            continue
        if tok in seen:
            pred[t] = seen[tok]
        else:
            seen[tok] = int(row[t + 1])
        t += 2


def _oracle_niah(row, pred):
    q = int(np.flatnonzero(row == QUERY)[-1])
    key = row[q + 1:q + 1 + KEY_LEN]
    for s in np.flatnonzero(row[:q] == NEEDLE):
        if np.array_equal(row[s + 1:s + 1 + KEY_LEN], key) and row[s + 1 + KEY_LEN] == IS:
            value_len = len(row) - (q + 2 + KEY_LEN)
            value = row[s + 2 + KEY_LEN:s + 2 + KEY_LEN + value_len]
            pred[q + 1 + KEY_LEN:q + 1 + KEY_LEN + len(value)] = value
            return


def _oracle_copy(row, pred):
    s = int(np.flatnonzero(row == SEP)[0])
    src = row[1:s]
    pred[s:s + len(src)] = src


def _oracle_selective_copy(row, pred):
    s = int(np.flatnonzero(row == SEP)[0])
    data = row[1:s][row[1:s] != BLANK]
    pred[s:s + len(data)] = data


_ORACLES = {"mqar": _oracle_mqar, "niah": _oracle_niah, "copy": _oracle_copy,
            "selective_copy": _oracle_selective_copy}


def oracle(batch: RecallBatch) -> np.ndarray:
    """Solves the task from batch.tokens only (a perfect model)."""
    pred = np.zeros_like(batch.tokens)
    solve = _ORACLES[batch.task]
    for row, out in zip(batch.tokens, pred):
        solve(row, out)
    return pred


def random_guesser(seed: int = 0) -> Predictor:
    """Uniform guesses among the task's answer ids (the chance level)."""
    rng = np.random.default_rng(seed)

    def predict(batch: RecallBatch) -> np.ndarray:
        return rng.choice(batch.answer_vocab, batch.tokens.shape)
    return predict


# ----------------------------------------------------------------------------------- scoring
def score(pred: np.ndarray, batch: RecallBatch) -> Dict[str, float]:
    """token_acc, exact_match, answers (count), samples, chance (1 / answer ids)."""
    if pred.shape != batch.tokens.shape:
        raise ValueError(f"pred shape {pred.shape} != tokens shape {batch.tokens.shape}")
    mask = batch.labels != IGNORE
    right = (pred == batch.labels) & mask
    per_sample = right.sum(1) == mask.sum(1)
    return {"token_acc": float(right.sum() / mask.sum()), "exact_match": float(per_sample.mean()),
            "answers": int(mask.sum()), "samples": int(len(pred)), "chance": 1.0 / len(batch.answer_vocab)}


def evaluate_lengths(predict: Predictor, task: str, lengths: Iterable[int], n: int, vocab_size: int,
                     seed: int = 0, **options) -> Dict[int, Dict[str, float]]:
    """score(predict(batch), batch) for a fresh evaluation batch of n samples at each length."""
    out = {}
    for length in lengths:
        batch = make_task(task, n, length, vocab_size, eval_seed(seed, length), **options)
        out[int(length)] = score(predict(batch), batch)
    return out


def format_table(results: Dict[int, Dict[str, float]], title: str) -> str:
    lines = [f"| {title} | token acc | exact match | chance |", "|---|---|---|---|"]
    for length, r in sorted(results.items()):
        lines.append(f"| T={length} | {100 * r['token_acc']:.1f}% | {100 * r['exact_match']:.1f}% "
                     f"| {100 * r['chance']:.2f}% |")
    return "\n".join(lines)


def task_options(args) -> dict:
    return {"num_kv": args.num_kv} if args.task == "mqar" and args.num_kv else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictor", choices=("oracle", "random"))
    src.add_argument("--checkpoint", type=Path, help="a train_recall.py --out directory")
    parser.add_argument("--task", default=None, choices=sorted(TASKS) + sorted(NIAH_PRESETS),
                        help="default: the checkpoint's task (mqar for a reference predictor)")
    parser.add_argument("--num-kv", type=int, default=None, help="mqar: key/value pairs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=128, help="reference predictors only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for length in args.lengths:
        if length < 4:
            raise ValueError(f"--lengths: {length} is too short (>= 4)")
    if args.checkpoint is not None:
        from train_recall import checkpoint_predictor

        predict, meta = checkpoint_predictor(args.checkpoint)
        args.task = args.task or meta["task"]
        if args.num_kv is None and args.task == meta["task"]:
            args.num_kv = meta.get("num_kv")
        vocab_size, title = meta["vocab_size"], f"{meta['name']} on {args.task}"
    else:
        args.task = args.task or "mqar"
        predict = oracle if args.predictor == "oracle" else random_guesser(args.seed)
        vocab_size, title = args.vocab_size, f"{args.predictor} on {args.task}"
    results = evaluate_lengths(predict, args.task, args.lengths, args.samples, vocab_size,
                               seed=args.seed, **task_options(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(
        {"task": args.task, "seed": args.seed, "samples": args.samples, "results": results}, indent=1))
    print(format_table(results, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
