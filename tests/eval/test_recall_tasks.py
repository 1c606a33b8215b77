"""Recall task generators and the accuracy scorer (examples/eval): deterministic for a seed,
answers checked by an independent solver (the oracle reads tokens only), oracle at 100% and a
uniform guesser at chance."""
import sys
from pathlib import Path

import numpy as np
import pytest

EVAL = Path(__file__).resolve().parents[2] / "examples" / "eval"
sys.path.insert(0, str(EVAL))

import recall_eval as re_  # noqa: E402
import recall_tasks as rt  # noqa: E402

VOCAB = 128
CASES = [("mqar", {"num_kv": 4}), ("mqar", {"num_kv": 12}), ("s_niah_1", {}), ("s_niah_2", {}),
         ("s_niah_3", {}), ("mk_niah_1", {}), ("copy", {}), ("selective_copy", {"num_data": 6})]
IDS = [f"{t}-{'-'.join(f'{k}{v}' for k, v in o.items())}" if o else t for t, o in CASES]


@pytest.mark.parametrize("task,options", CASES, ids=IDS)
def test_deterministic_for_a_seed(task, options):
    a = rt.make_task(task, 8, 96, VOCAB, 3, **options)
    b = rt.make_task(task, 8, 96, VOCAB, 3, **options)
    c = rt.make_task(task, 8, 96, VOCAB, 4, **options)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("task,options", CASES, ids=IDS)
@pytest.mark.parametrize("length", [64, 257])
def test_layout_and_oracle(task, options, length):
    batch = rt.make_task(task, 16, length, VOCAB, 0, **options)
    assert batch.tokens.shape == batch.labels.shape == (16, length)
    assert batch.tokens.min() >= 0 and batch.tokens.max() < VOCAB
    mask = batch.mask
    assert mask.any(1).all(), "every sample has an answer"
    # labels are the next tokens, and answers come from the task's answer ids
    np.testing.assert_array_equal(batch.labels[:, :-1][mask[:, :-1]], batch.tokens[:, 1:][mask[:, :-1]])
    assert np.isin(batch.labels[mask], batch.answer_vocab).all()
    result = re_.score(re_.oracle(batch), batch)
    assert result["token_acc"] == 1.0 and result["exact_match"] == 1.0


def test_mqar_answers_by_hand():
    batch = rt.make_mqar(4, 40, VOCAB, 1, num_kv=5)
    for row, labels in zip(batch.tokens, batch.labels):
        pairs = dict(zip(row[1:11:2].tolist(), row[2:11:2].tolist()))
        assert len(pairs) == 5, "distinct keys"
        queried = [int(row[t]) for t in np.flatnonzero(labels != rt.IGNORE)]
        assert sorted(queried) == sorted(pairs), "each key asked once"
        for t in np.flatnonzero(labels != rt.IGNORE):
            assert labels[t] == pairs[int(row[t])]


def test_mk_niah_distractor_needles_have_other_keys():
    batch = rt.make_task("mk_niah_1", 8, 200, VOCAB, 2)
    for row in batch.tokens:
        starts = np.flatnonzero(row == rt.NEEDLE)
        assert len(starts) == 4
        keys = {tuple(row[s + 1:s + 1 + rt.KEY_LEN]) for s in starts}
        assert len(keys) == 4


def test_oracle_catches_a_wrong_answer():
    batch = rt.make_task("s_niah_2", 4, 80, VOCAB, 0)
    pred = re_.oracle(batch)
    t = np.flatnonzero(batch.mask[0])[0]
    pred[0, t] = (pred[0, t] + 1) % VOCAB
    result = re_.score(pred, batch)
    assert result["exact_match"] == 0.75
    assert result["token_acc"] == 1 - 1 / batch.mask.sum()


@pytest.mark.parametrize("task,options", CASES[:1] + CASES[2:3] + CASES[4:5] + CASES[6:7], ids=["mqar", "s_niah_1", "s_niah_3", "copy"])
def test_random_guesser_at_chance(task, options):
    results = re_.evaluate_lengths(re_.random_guesser(7), task, [128], 400, VOCAB, seed=0, **options)
    r = results[128]
    p, n = r["chance"], r["answers"]
    # binomial: 5 standard deviations of the mean of n guesses
    assert abs(r["token_acc"] - p) < 5 * np.sqrt(p * (1 - p) / n), r


def test_evaluate_lengths_uses_unseen_seeds():
    a = re_.evaluate_lengths(re_.oracle, "mqar", [64, 128], 4, VOCAB)
    assert set(a) == {64, 128} and all(r["exact_match"] == 1.0 for r in a.values())
    assert re_.eval_seed(0, 64) % 2 == 1


@pytest.mark.parametrize("call,message", [
    (lambda: rt.make_mqar(2, 16, VOCAB, 0, num_kv=8), "length=16 too short"),
    (lambda: rt.make_mqar(2, 64, 32, 0), "vocab_size"),
    (lambda: rt.make_niah(2, 64, VOCAB, 0, haystack="poem"), "haystack"),
    (lambda: rt.make_task("recall", 2, 64, VOCAB, 0), "task='recall'"),
    (lambda: rt.make_selective_copy(2, 10, VOCAB, 0, num_data=8), "num_data=8"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
