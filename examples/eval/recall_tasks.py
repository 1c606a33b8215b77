"""Synthetic in-context recall tasks: token batches with the answers marked, deterministic for a seed.

    python examples/eval/recall_tasks.py mqar --length 64 --num-kv 8 --seed 0     # print a sample

Why these tasks: they separate recurrent token mixers by how well the fixed-size state stores
and retrieves associations (the Gated DeltaNet paper's recall claims), with small models and
minutes of training, and their answers are known exactly.

Tasks (each a `make_<task>(n, length, vocab_size, seed, ...)` returning a `RecallBatch`):
- `mqar`: multi-query associative recall (Zoology, Arora et al. 2023): `num_kv` key/value
  pairs, then queries scattered over the rest of the sequence; each query key is followed by
  its value, which is the answer.
- `niah`: needle in a haystack in the style of RULER's S-NIAH-1/2/3 and MK-NIAH: needles
  "NEEDLE key.. IS value.." hidden in distractor text, a query "QUERY key.. IS" at the end, the
  value tokens are the answer. `haystack="repeat"` (S-NIAH-1: one filler sentence repeated),
  `"essay"` (S-NIAH-2: random distractor words), `value_len` 1-4 digits (S-NIAH-1/2) or 8
  "hex" tokens (S-NIAH-3, UUID-like); `num_needles > 1`: the other needles carry other keys
  (MK-NIAH-1).
- `copy`: a random string, SEP, the same string again (the second half is the answer).
- `selective_copy` (Mamba, Gu and Dao 2023): `num_data` data tokens scattered among blanks,
  SEP, then the data tokens in order (the answer).

Token layout (vocab_size >= 64): ids 0..7 are specials (PAD, BOS, SEP, NEEDLE, IS, QUERY,
BLANK, unused); the content ids 8..vocab_size-1 are split per task into disjoint ranges (keys,
values, distractors) listed in `RecallBatch.answer_vocab` (the ids an answer can take: a
uniform guesser over them is the chance level).

Layout of a batch (GPT convention, what Megatron's GPTModel is trained with): `tokens` [N, T];
`labels` [N, T] with labels[:, t] = tokens[:, t + 1] where position t must predict an answer
token and IGNORE elsewhere. Accuracy is scored at the labelled positions only (teacher-forced;
a sample whose every answer token is right is what greedy decoding would produce).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np

__all__ = [
    "PAD", "BOS", "SEP", "NEEDLE", "IS", "QUERY", "BLANK", "IGNORE", "FIRST_CONTENT",
    "RecallBatch", "make_mqar", "make_niah", "make_copy", "make_selective_copy", "TASKS",
    "make_task", "NIAH_PRESETS",
]

PAD, BOS, SEP, NEEDLE, IS, QUERY, BLANK = range(7)
FIRST_CONTENT = 8
IGNORE = -100
MIN_VOCAB = 64


@dataclass
class RecallBatch:
    """tokens, labels: int64 [N, T]; answer_vocab: the ids an answer token can take."""

    task: str
    tokens: np.ndarray
    labels: np.ndarray
    answer_vocab: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.labels != IGNORE


def _check(name, value, low, high=None):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low \
            or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _common(n, length, vocab_size):
    _check("n", n, 1)
    _check("length", length, 4)
    _check("vocab_size", vocab_size, MIN_VOCAB)


def _finish(task, tokens, answer_pos, answer_vocab) -> RecallBatch:
    """labels[t] = tokens[t + 1] where token t + 1 is an answer token (answer_pos marks them)."""
    labels = np.full_like(tokens, IGNORE)
    labels[:, :-1] = np.where(answer_pos[:, 1:], tokens[:, 1:], IGNORE)
    return RecallBatch(task, tokens, labels, np.asarray(answer_vocab, dtype=np.int64))


# ----------------------------------------------------------------------------------- MQAR
def make_mqar(n: int, length: int, vocab_size: int, seed: int, num_kv: int = 8) -> RecallBatch:
    """BOS k1 v1 .. kN vN, then one query per key (random order) at random non-overlapping
    slots "k v" in a field of PAD; keys from the lower half of the content ids, values from the
    upper half, distinct keys per sample. length >= 1 + 4 num_kv."""
    _common(n, length, vocab_size)
    _check("num_kv", num_kv, 1)
    if length < 1 + 4 * num_kv:
        raise ValueError(f"length={length} too short for num_kv={num_kv} (needs >= {1 + 4 * num_kv})")
    half = (vocab_size - FIRST_CONTENT) // 2
    if num_kv > half:
        raise ValueError(f"num_kv={num_kv} exceeds the {half} distinct keys of vocab_size={vocab_size}")
    key_ids = np.arange(FIRST_CONTENT, FIRST_CONTENT + half)
    value_ids = np.arange(FIRST_CONTENT + half, vocab_size)
    rng = np.random.default_rng(seed)
    tokens = np.full((n, length), PAD, dtype=np.int64)
    answer = np.zeros((n, length), dtype=bool)
    tokens[:, 0] = BOS
    context = 1 + 2 * num_kv
    free_slots = (length - context) // 2
    for i in range(n):
        keys = rng.choice(key_ids, num_kv, replace=False)
        values = rng.choice(value_ids, num_kv, replace=True)
        tokens[i, 1:context:2], tokens[i, 2:context:2] = keys, values
        order = rng.permutation(num_kv)
        slots = np.sort(rng.choice(free_slots, num_kv, replace=False))
        pos = context + 2 * slots
        tokens[i, pos], tokens[i, pos + 1] = keys[order], values[order]
        answer[i, pos + 1] = True
    return _finish("mqar", tokens, answer, value_ids)


# ----------------------------------------------------------------------------------- NIAH
NIAH_PRESETS: Dict[str, dict] = {
    "s_niah_1": dict(haystack="repeat", value_len=4, num_needles=1),
    "s_niah_2": dict(haystack="essay", value_len=4, num_needles=1),
    "s_niah_3": dict(haystack="essay", value_len=8, num_needles=1, hex_values=True),
    "mk_niah_1": dict(haystack="essay", value_len=4, num_needles=4),
}
KEY_LEN = 2
FILLER_LEN = 12


def _niah_ranges(vocab_size):
    """digits (10 ids), hex (16 ids, digits included), key words, distractor words."""
    digits = np.arange(FIRST_CONTENT, FIRST_CONTENT + 10)
    hex_ids = np.arange(FIRST_CONTENT, FIRST_CONTENT + 16)
    rest = vocab_size - FIRST_CONTENT - 16
    keys = np.arange(FIRST_CONTENT + 16, FIRST_CONTENT + 16 + rest // 2)
    words = np.arange(FIRST_CONTENT + 16 + rest // 2, vocab_size)
    return digits, hex_ids, keys, words


def make_niah(n: int, length: int, vocab_size: int, seed: int, haystack: str = "essay",
              value_len: int = 4, num_needles: int = 1, hex_values: bool = False) -> RecallBatch:
    """Haystack of `length` tokens holding `num_needles` needles NEEDLE k1 k2 IS v1..vL at
    random depths (keys distinct, KEY_LEN words each); the last 3 + KEY_LEN + value_len tokens
    are QUERY k1 k2 IS v1..vL for one of the needles. See the module docstring for presets."""
    _common(n, length, vocab_size)
    if haystack not in ("repeat", "essay"):
        raise ValueError(f"haystack must be 'repeat' or 'essay', got {haystack!r}")
    _check("value_len", value_len, 1, 16)
    _check("num_needles", num_needles, 1)
    needle_len = 2 + KEY_LEN + value_len
    query_len = 2 + KEY_LEN + value_len
    body = length - 1 - query_len
    if body < num_needles * needle_len:
        raise ValueError(f"length={length} too short for {num_needles} needles of {needle_len} tokens "
                         f"and a query of {query_len} (needs >= {1 + query_len + num_needles * needle_len})")
    digits, hex_ids, key_ids, word_ids = _niah_ranges(vocab_size)
    value_ids = hex_ids if hex_values else digits
    rng = np.random.default_rng(seed)
    filler = rng.choice(word_ids, FILLER_LEN)
    tokens = np.empty((n, length), dtype=np.int64)
    answer = np.zeros((n, length), dtype=bool)
    for i in range(n):
        if haystack == "repeat":
            hay = np.resize(filler, body)
        else:
            hay = rng.choice(word_ids, body)
        keys = np.stack([rng.choice(key_ids, KEY_LEN) for _ in range(num_needles)])
        while len({tuple(k) for k in keys}) < num_needles:
            keys = np.stack([rng.choice(key_ids, KEY_LEN) for _ in range(num_needles)])
        values = rng.choice(value_ids, (num_needles, value_len))
        # needle starts: sorted, non-overlapping, anywhere in the body (depth uniform)
        gaps = body - num_needles * needle_len
        starts = np.sort(rng.choice(gaps + num_needles, num_needles, replace=False))
        starts = starts - np.arange(num_needles) + np.arange(num_needles) * needle_len
        for j, s in enumerate(starts):
            hay[s:s + needle_len] = np.concatenate([[NEEDLE], keys[j], [IS], values[j]])
        asked = rng.integers(num_needles)
        query = np.concatenate([[QUERY], keys[asked], [IS], values[asked]])
        tokens[i] = np.concatenate([[BOS], hay, query])
        answer[i, length - value_len:] = True
    return _finish("niah", tokens, answer, value_ids)


# ----------------------------------------------------------------------------------- copy
def make_copy(n: int, length: int, vocab_size: int, seed: int) -> RecallBatch:
    """BOS x1..xL SEP x1..xL (PAD to `length`), L = (length - 2) // 2 content tokens."""
    _common(n, length, vocab_size)
    span = (length - 2) // 2
    content = np.arange(FIRST_CONTENT, vocab_size)
    rng = np.random.default_rng(seed)
    tokens = np.full((n, length), PAD, dtype=np.int64)
    answer = np.zeros((n, length), dtype=bool)
    x = rng.choice(content, (n, span))
    tokens[:, 0], tokens[:, 1:1 + span], tokens[:, 1 + span] = BOS, x, SEP
    tokens[:, 2 + span:2 + 2 * span] = x
    answer[:, 2 + span:2 + 2 * span] = True
    return _finish("copy", tokens, answer, content)


def make_selective_copy(n: int, length: int, vocab_size: int, seed: int, num_data: int = 8) -> RecallBatch:
    """BOS, a field of BLANK holding `num_data` data tokens at random positions, SEP, the data
    tokens in order. length >= 2 + 2 num_data."""
    _common(n, length, vocab_size)
    _check("num_data", num_data, 1)
    field_len = length - 2 - num_data
    if field_len < num_data:
        raise ValueError(f"length={length} too short for num_data={num_data} (needs >= {2 + 2 * num_data})")
    content = np.arange(FIRST_CONTENT, vocab_size)
    rng = np.random.default_rng(seed)
    tokens = np.full((n, length), BLANK, dtype=np.int64)
    answer = np.zeros((n, length), dtype=bool)
    tokens[:, 0], tokens[:, 1 + field_len] = BOS, SEP
    for i in range(n):
        data = rng.choice(content, num_data)
        where = np.sort(rng.choice(field_len, num_data, replace=False))
        tokens[i, 1 + where] = data
        tokens[i, 2 + field_len:] = data
    answer[:, 2 + field_len:] = True
    return _finish("selective_copy", tokens, answer, content)


TASKS: Dict[str, Callable[..., RecallBatch]] = {
    "mqar": make_mqar, "niah": make_niah, "copy": make_copy, "selective_copy": make_selective_copy,
}


def make_task(name: str, n: int, length: int, vocab_size: int, seed: int, **options) -> RecallBatch:
    """`name`: a key of TASKS or of NIAH_PRESETS (s_niah_1/2/3, mk_niah_1)."""
    if name in NIAH_PRESETS:
        return make_niah(n, length, vocab_size, seed, **{**NIAH_PRESETS[name], **options})
    if name not in TASKS:
        raise ValueError(f"task={name!r}: expected one of {sorted(TASKS) + sorted(NIAH_PRESETS)}")
    return TASKS[name](n, length, vocab_size, seed, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS) + sorted(NIAH_PRESETS))
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-kv", type=int, default=None, help="mqar: key/value pairs")
    args = parser.parse_args(argv)
    options = {"num_kv": args.num_kv} if args.task == "mqar" and args.num_kv else {}
    batch = make_task(args.task, 1, args.length, args.vocab_size, args.seed, **options)
    print("tokens:", batch.tokens[0].tolist())
    print("answers at", np.flatnonzero(batch.mask[0]).tolist(), ":", batch.labels[0][batch.mask[0]].tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
