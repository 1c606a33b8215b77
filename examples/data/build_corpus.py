"""Build a small text corpus from the Python standard library's own sources (JSONL, one module
per line), so the CPU pretraining default needs no download:

    python examples/data/build_corpus.py --out runs/cpu_demo/data --max-mb 4

Writes OUT/stdlib.jsonl ({"text": <piece of a module>, "path": <path relative to the stdlib>}):
each module is cut at blank lines into documents of at most --doc-kb KB, so that even a small
corpus has enough documents for Megatron's train/valid/test split (it splits by document).
Modules are taken in sorted path order until --max-mb is reached, so the corpus is the same on
every run of the same Python installation. Re-running with an existing, complete file is a
no-op (the file is written under a temporary name and renamed at the end).
"""
import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


def stdlib_sources(max_bytes: int):
    """(relative path, text) of stdlib .py files, sorted, tests and site-packages skipped,
    until max_bytes of UTF-8 text have been yielded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield rel, text
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            return


def pieces(text: str, max_bytes: int):
    """`text` cut at blank lines into pieces of at most ~max_bytes (a longer paragraph stays
    whole)."""
    piece = []
    size = 0
    for para in text.split("\n\n"):
        n = len(para.encode("utf-8")) + 2
        if piece and size + n > max_bytes:
            yield "\n\n".join(piece) + "\n"
            piece, size = [], 0
        piece.append(para)
        size += n
    if piece and "".join(piece).strip():
        yield "\n\n".join(piece) + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-mb", type=float, default=4.0, help="corpus size in MB of text")
    parser.add_argument("--doc-kb", type=float, default=4.0, help="largest document in KB")
    args = parser.parse_args(argv)
    if args.max_mb <= 0:
        raise ValueError(f"--max-mb must be positive, got {args.max_mb}")
    if args.doc_kb <= 0:
        raise ValueError(f"--doc-kb must be positive, got {args.doc_kb}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "stdlib.jsonl"
    if target.exists():
        print(f"[corpus] {target} exists, reusing it")
        return target
    tmp = target.with_suffix(f".jsonl.tmp{os.getpid()}")
    n_docs = n_bytes = 0
    with tmp.open("w", encoding="utf-8") as f:
        for rel, text in stdlib_sources(int(args.max_mb * 2**20)):
            for piece in pieces(text, int(args.doc_kb * 1024)):
                f.write(json.dumps({"text": piece, "path": rel}) + "\n")
                n_docs += 1
                n_bytes += len(piece.encode("utf-8"))
    if n_docs == 0:
        tmp.unlink()
        raise RuntimeError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}")
    tmp.replace(target)
    print(f"[corpus] {target}: {n_docs} documents, {n_bytes / 2**20:.2f} MB "
          f"(Python {sys.version.split()[0]} standard library)")
    return target


if __name__ == "__main__":
    main()
