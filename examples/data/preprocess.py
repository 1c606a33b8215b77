"""Tokenize text or JSONL into Megatron's indexed dataset (`<prefix>.bin` + `<prefix>.idx`,
megatron.core.datasets.indexed_dataset), one document per JSONL line or per text file:

    # our byte tokenizer (no download)
    python examples/data/preprocess.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type ByteTokenizer
    # any tokenizer Megatron supports, e.g. a Hugging Face one
    python examples/data/preprocess.py --input a.jsonl b.jsonl --output-prefix data/mix \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model Qwen/Qwen3-0.6B

The training flag is then `--data-path <prefix>_text_document` (Megatron-LM's naming: the
JSON key and "document" are appended). A prefix made by Megatron-LM's own
tools/preprocess_data.py is the same format and works unchanged. Every document gets the
tokenizer's end-of-document id appended (Megatron's GPT dataset concatenates documents and
needs the separator); --no-append-eod turns that off.
"""
import argparse
import json
from pathlib import Path

import numpy
import torch

from megatron_gdn.training.tokenizer import BYTE_TOKENIZER, build_text_tokenizer


def read_documents(paths, json_key: str):
    """Yield document texts: each line of a .jsonl/.json file (its `json_key`), each whole
    file otherwise."""
    for path in paths:
        path = Path(path)
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if json_key not in record:
                        raise ValueError(f"{path}:{lineno}: no key {json_key!r} (--json-key)")
                    yield record[json_key]
        else:
            yield path.read_text(encoding="utf-8")


def token_dtype(vocab_size: int):
    # uint16 halves the file for vocabularies that fit (Megatron-LM's choice as well)
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def preprocess(inputs, output_prefix: str, tokenizer, json_key: str = "text",
               append_eod: bool = True) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = f"{output_prefix}_{json_key}_document"
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(tokenizer.vocab_size))
    n_docs = n_tokens = 0
    for text in read_documents(inputs, json_key):
        ids = tokenizer.tokenize(text)
        if append_eod:
            ids = ids + [tokenizer.eod]
        if not ids:
            continue
        builder.add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    if n_docs == 0:
        raise ValueError(f"--input {list(map(str, inputs))}: no documents found")
    builder.finalize(f"{prefix}.idx")
    return {"prefix": prefix, "documents": n_docs, "tokens": n_tokens}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.json or text files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizer-type", default=BYTE_TOKENIZER,
                        help=f"{BYTE_TOKENIZER} (ours) or any Megatron --tokenizer-type")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    parser.add_argument("--no-append-eod", action="store_true")
    args = parser.parse_args(argv)
    for path in args.input:
        if not Path(path).is_file():
            raise ValueError(f"--input {path!r}: no such file")
    kwargs = {}
    if args.tokenizer_type != BYTE_TOKENIZER:
        kwargs = dict(tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                      merge_file=args.merge_file, vocab_size=args.vocab_size)
    tokenizer = build_text_tokenizer(args.tokenizer_type, **kwargs)
    stats = preprocess(args.input, args.output_prefix, tokenizer, args.json_key,
                       append_eod=not args.no_append_eod)
    print(f"[preprocess] {stats['prefix']}.{{bin,idx}}: {stats['documents']} documents, "
          f"{stats['tokens']} tokens ({args.tokenizer_type}, vocab {tokenizer.vocab_size})")
    return stats


if __name__ == "__main__":
    main()
