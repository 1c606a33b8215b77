"""Build a small text corpus from the Python standard library's own sources (JSONL, one module
per line), so the CPU pretraining default needs no download:

    python examples/data/build_corpus.py --out runs/cpu_demo/data --max-mb 4

Writes OUT/stdlib.jsonl ({"text": <module source>, "path": <path relative to the stdlib>}).
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


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-mb", type=float, default=4.0, help="corpus size in MB of text")
    args = parser.parse_args(argv)
    if args.max_mb <= 0:
        raise ValueError(f"--max-mb must be positive, got {args.max_mb}")
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
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
    if n_docs == 0:
        tmp.unlink()
        raise RuntimeError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}")
    tmp.replace(target)
    print(f"[corpus] {target}: {n_docs} documents, {n_bytes / 2**20:.2f} MB "
          f"(Python {sys.version.split()[0]} standard library)")
    return target


if __name__ == "__main__":
    main()
