"""examples/data: the corpus builder and the preprocessing script round-trip text through
Megatron's indexed dataset."""
import json
import sys

import numpy
import pytest

from helpers import CORPUS, PREPROCESS, run

DOCS = ["def f(x):\n    return x + 1\n", "ünïcödé — 漢字 ✓", "a"]


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [numpy.asarray(ds[i]) for i in range(len(ds))], ds


def test_jsonl_round_trip_byte_tokenizer(tmp_path):
    sys.path.insert(0, str(PREPROCESS.parent))
    try:
        import preprocess
    finally:
        sys.path.pop(0)
    from megatron_gdn.training.tokenizer import ByteTokenizer

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    stats = preprocess.main(["--input", str(src), "--output-prefix", str(tmp_path / "c")])
    assert stats["documents"] == len(DOCS)
    items, ds = _read(stats["prefix"])
    tok = ByteTokenizer()
    assert len(items) == len(DOCS)
    assert ds.index.dtype == numpy.uint16
    for doc, ids in zip(DOCS, items):
        assert ids[-1] == tok.eod == 256
        assert tok.detokenize(ids[:-1]) == doc
        assert list(ids[:-1]) == list(doc.encode("utf-8"))
    assert stats["tokens"] == sum(len(d.encode("utf-8")) + 1 for d in DOCS)


def test_text_files_and_bad_key(tmp_path):
    sys.path.insert(0, str(PREPROCESS.parent))
    try:
        import preprocess
    finally:
        sys.path.pop(0)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(DOCS[0])
    b.write_text(DOCS[1])
    stats = preprocess.main(["--input", str(a), str(b), "--output-prefix", str(tmp_path / "t"),
                             "--no-append-eod"])
    items, _ = _read(stats["prefix"])
    assert [bytes(i.astype(numpy.uint8)).decode() for i in items] == DOCS[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="no key 'body'"):
        preprocess.main(["--input", str(bad), "--output-prefix", str(tmp_path / "x"),
                         "--json-key", "body"])
    with pytest.raises(ValueError, match="tokenizer_type='Nope'"):
        preprocess.main(["--input", str(bad), "--output-prefix", str(tmp_path / "y"),
                         "--tokenizer-type", "Nope"])


def test_corpus_builder_is_deterministic(tmp_path):
    for name in ("one", "two"):
        proc = run([sys.executable, str(CORPUS), "--out", str(tmp_path / name), "--max-mb", "0.05"])
        assert proc.returncode == 0, proc.stderr
    one = (tmp_path / "one" / "stdlib.jsonl").read_text()
    assert one == (tmp_path / "two" / "stdlib.jsonl").read_text()
    docs = [json.loads(line) for line in one.splitlines()]
    assert docs and all(d["text"].strip() and d["path"].endswith(".py") for d in docs)
