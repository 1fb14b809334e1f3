"""A real-text corpus that is on the machine offline: the paragraphs of the English manual pages
that ship with installed Debian packages (``/usr/share/man/man1`` ... ``man8``), as JSON lines.

``python -m benchmarks.memorization.manpages --out data/manpages.jsonl`` (``make manpages``).
The roff source is reduced to running text by rules, not rendered: macro definitions, requests
and font escapes go, text-carrying macros (``.B``, ``.IR`` ...) keep their words, and a paragraph
ends at each paragraph or section macro. Paragraphs that are mostly symbols (synopses, tables,
code) or shorter than ``min_words`` are left out; exact repeats (pages shared by several
packages, boilerplate) are kept once, in file-name order, so the file is the same on every run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import zlib
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

MAN_ROOT = Path("/usr/share/man")
SECTIONS = ("man1", "man2", "man3", "man4", "man5", "man6", "man7", "man8")
# paragraph and section macros of man(7) and mdoc(7)
BREAKS = {"PP", "P", "LP", "TP", "IP", "HP", "SH", "SS", "sp", "br", "TQ", "RS", "RE", "nf", "fi", "EX", "EE",
          "Sh", "Ss", "Pp", "Lp", "Bl", "El", "It", "Bd", "Ed", "D1", "Dl"}
SECTION_MACROS = {"SH", "Sh"}
# macros whose arguments are running text: man(7) fonts, mdoc(7) inline semantics
TEXT_MACROS = {"B", "I", "R", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI",
               "Nm", "Ar", "Em", "Sy", "Pa", "Xr", "Va", "Ev", "Cm", "Dq", "Ql", "Li", "Ic", "Dv", "Er", "Fn",
               "Ft", "Sq", "Pq", "Aq", "Tn", "No", "Ns", "Ux", "Fa", "Vt", "Mt", "Lk"}
_COMMENT = re.compile(r'\\["#].*$')  # \" and \# comments run to the end of the line
SKIPPED_SECTIONS = {"SYNOPSIS", "SEE ALSO", "AUTHOR", "AUTHORS", "COPYRIGHT", "REPORTING BUGS", "FILES", "EXAMPLE",
                    "EXAMPLES", "NAME"}
_NAMED = {"aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "em": "-", "en": "-", "hy": "-",
          "mi": "-", "bu": "*", "co": "(c)", "rg": "(R)", "ti": "~", "ha": "^", "ga": "`", "bv": "|", "at": "@",
          "sh": "#", "Fo": '"', "Fc": '"', "fo": "'", "fc": "'"}
_ESCAPES = [
    (re.compile(r"\\f(\(..|\[[^\]]*\]|.)"), ""),                           # font changes
    (re.compile(r"\\s[+-]?(\(..|\[[^\]]*\]|\d+)"), ""),                    # size changes
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),                          # string interpolation
    (re.compile(r"\\[nk](\(..|\[[^\]]*\]|.)"), ""),                        # registers
    (re.compile(r"\\\((..)"), lambda m: _NAMED.get(m.group(1), "")),     # \(xx special characters
    (re.compile(r"\\\[([^\]]*)\]"), lambda m: _NAMED.get(m.group(1), "")),
    (re.compile(r"\\[hvwoxlLDNbXZ]'[^']*'"), ""),                          # motions, drawings
    (re.compile(r"\\-"), "-"), (re.compile(r"\\e"), lambda m: "\\"),
    (re.compile(r"\\ "), " "), (re.compile(r"\\~"), " "),
    (re.compile(r"\\[&|^c%:/,)0]"), ""),
    (re.compile(r"\\."), ""),                                              # anything else escaped
]


def _plain(text: str) -> str:
    for pattern, repl in _ESCAPES:
        text = pattern.sub(repl, text)
    return text


def _macro_words(args: str) -> str:
    return " ".join(part.strip('"') for part in re.findall(r'"[^"]*"|\S+', args))


def paragraphs(source: str, min_words: int = 16) -> Iterator[str]:
    """Running-text paragraphs of one page's roff source (man or mdoc macros)."""
    words: list[str] = []
    section = ""
    in_definition = title_next = False

    def flush() -> Iterator[str]:
        text = " ".join(" ".join(words).split())
        words.clear()
        if section in SKIPPED_SECTIONS or len(text.split()) < min_words:
            return
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if letters / len(text) >= 0.9 and not re.search(r"[{};<>=]", text):
            yield text

    for raw in source.splitlines():
        if in_definition:
            in_definition = raw.rstrip() not in ("..", ".  .", ". .")
            continue
        line = _COMMENT.sub("", raw).rstrip()
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            if name in ("de", "de1", "am", "ig"):
                in_definition = True
                continue
            if name in BREAKS:
                yield from flush()
                if name in SECTION_MACROS:
                    section = _plain(_macro_words(args)).upper()
                    title_next = not args.strip()  # `.SH` alone: the title is the next line
                continue
            if name in TEXT_MACROS:
                words.append(_plain(_macro_words(args)))
            continue  # any other request or macro: no text
        if not line.strip():
            if not raw.strip():
                yield from flush()
            continue
        if title_next:
            section, title_next = _plain(line).strip().upper(), False
            continue
        words.append(_plain(line))
    yield from flush()


def pages(root: Path = MAN_ROOT) -> list[Path]:
    """The English manual pages under ``root`` (regular files; links and ``.so`` stubs are
    duplicates of pages read anyway), sorted by path."""
    found = []
    for section in SECTIONS:
        folder = root / section
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()]
    return sorted(found)


def read_page(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def build(out: Path, root: Path = MAN_ROOT, min_words: int = 16, limit: int | None = None) -> dict:
    """Write ``out`` (JSON lines, one ``{"text", "page"}`` per paragraph); returns counts."""
    files = pages(root)[:limit]
    if not files:
        raise FileNotFoundError(f"no manual pages under {root}/man1..man8 "
                                "(are the packages' manual pages left out of this image?)")
    seen: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for path in tqdm(files, desc="manual pages", mininterval=2.0):
            try:
                source = read_page(path)
            except (OSError, EOFError, gzip.BadGzipFile, zlib.error):
                continue
            if source.lstrip().startswith(".so "):
                continue
            for text in paragraphs(source, min_words):
                if text not in seen:
                    seen.add(text)
                    f.write(json.dumps({"text": text, "page": path.name}) + "\n")
    tmp.replace(out)
    return {"pages": len(files), "paragraphs": len(seen), "words": sum(len(t.split()) for t in seen)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/manpages.jsonl")
    parser.add_argument("--root", default=str(MAN_ROOT))
    parser.add_argument("--min-words", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="read only the first N pages")
    args = parser.parse_args(argv)
    counts = build(Path(args.out), Path(args.root), args.min_words, args.limit)
    print(json.dumps({"out": args.out, **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
