"""A second real-text corpus that is on every machine with Python: the paragraphs of the standard
library's docstrings (modules, classes, functions), as JSON lines.

``python -m benchmarks.memorization.docstrings --out data/docstrings.jsonl`` (``make docstrings``).
Docstrings are read with ``ast`` (no module is imported); a paragraph is a blank-line-separated
block joined into one line. Paragraphs under ``min_words`` words or mostly symbols (doctests,
tables, signatures) are left out, and exact repeats are kept once, in file-name order.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterator


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's Python files, tests and site-packages left out, in name order."""
    skip = {"site-packages", "test", "tests", "idle_test", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def paragraphs(text: str, min_words: int) -> Iterator[str]:
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        if any(line.startswith((">>>", "...")) for line in lines):
            continue
        para = " ".join(line for line in lines if line)
        words = para.split()
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if len(words) >= min_words and letters >= 0.85 * len(para):
            yield para


def build(out: Path, root: Path, min_words: int = 8) -> dict:
    seen: dict[str, None] = {}
    files = stdlib_files(root)
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for doc in docstrings(source):
            for para in paragraphs(doc, min_words):
                seen.setdefault(para, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for para in seen:
            f.write(json.dumps({"text": para}) + "\n")
    return {"out": str(out), "files": len(files), "paragraphs": len(seen),
            "words": sum(len(p.split()) for p in seen)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/docstrings.jsonl")
    parser.add_argument("--root", default=sysconfig.get_paths()["stdlib"], help="the standard library's folder")
    parser.add_argument("--min-words", type=int, default=8)
    args = parser.parse_args(argv)
    print(json.dumps(build(Path(args.out), Path(args.root), args.min_words)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
