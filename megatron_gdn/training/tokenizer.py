"""Tokenizers for preprocessing and training.

`ByteTokenizer` maps text to its UTF-8 bytes (ids 0..255) and appends an end-of-document id 256;
it needs no vocabulary file and no download. Its id space is exactly that of Megatron's
`NullTokenizer` with `--vocab-size 257` (ids 0..256, EOD = vocab_size - 1 = 256), so a
corpus preprocessed with it trains under Megatron's own tokenizer machinery with

    --tokenizer-type NullTokenizer --vocab-size 257

which is what `examples/pretrain_gdn.py --tokenizer-type ByteTokenizer` expands to
(`megatron_args_for`). Every other tokenizer is Megatron's (`build_megatron_tokenizer`).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List, Optional

__all__ = [
    "ByteTokenizer",
    "BYTE_TOKENIZER",
    "BYTE_VOCAB_SIZE",
    "megatron_args_for",
    "build_megatron_tokenizer",
    "build_text_tokenizer",
]

BYTE_TOKENIZER = "ByteTokenizer"
# 256 byte values + the end-of-document id
BYTE_VOCAB_SIZE = 257


class ByteTokenizer:
    """UTF-8 bytes as token ids; `eod` = 256. Decoding replaces invalid byte runs (a sample
    window may cut a multi-byte character) instead of raising."""

    vocab_size = BYTE_VOCAB_SIZE
    eod = BYTE_VOCAB_SIZE - 1

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @property
    def unique_identifiers(self) -> Dict[str, object]:
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "vocab_size": self.vocab_size}


def megatron_args_for(tokenizer_type: str) -> List[str]:
    """Megatron flags that train on ids produced by `tokenizer_type` (only ByteTokenizer needs a
    translation; the others are Megatron's own names and pass through unchanged)."""
    if tokenizer_type == BYTE_TOKENIZER:
        return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(BYTE_VOCAB_SIZE)]
    return ["--tokenizer-type", tokenizer_type]


class _MegatronTokenizerArgs(SimpleNamespace):
    """The argparse namespace megatron.core's `build_tokenizer` reads; flags not given are None."""

    def __getattr__(self, name):
        return None


class _MegatronTextTokenizer:
    """Adapter: Megatron's text tokenizer as `tokenize` / `eod` / `vocab_size`."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    @property
    def eod(self) -> int:
        return self._tok.eod

    def tokenize(self, text: str) -> List[int]:
        return list(self._tok.tokenize(text))

    def detokenize(self, ids) -> str:
        return self._tok.detokenize(list(ids))


def build_megatron_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                             vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                             vocab_size: Optional[int] = None):
    """One of Megatron's tokenizers (`--tokenizer-type` names), built as megatron.training does."""
    from megatron.core.tokenizers.utils.build_tokenizer import SUPPORTED_TOKENIZERS, build_tokenizer

    if tokenizer_type not in SUPPORTED_TOKENIZERS:
        raise ValueError(
            f"tokenizer_type={tokenizer_type!r}: expected {BYTE_TOKENIZER!r} or one of Megatron's "
            f"{SUPPORTED_TOKENIZERS}"
        )
    args = _MegatronTokenizerArgs(
        tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_file=vocab_file,
        merge_file=merge_file, vocab_size=vocab_size, special_tokens=[], pad_vocab_size=False,
        tokenizer_hf_no_use_fast=False, tokenizer_hf_no_include_special_tokens=False,
        trust_remote_code=False, tiktoken_num_special_tokens=1000, rank=0,
    )
    return build_tokenizer(args)


def build_text_tokenizer(tokenizer_type: str, **kwargs):
    """ByteTokenizer or a Megatron tokenizer, both exposing tokenize / detokenize / eod /
    vocab_size."""
    if tokenizer_type == BYTE_TOKENIZER:
        return ByteTokenizer()
    return _MegatronTextTokenizer(build_megatron_tokenizer(tokenizer_type, **kwargs))
