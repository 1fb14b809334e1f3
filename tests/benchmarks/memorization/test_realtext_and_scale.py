"""The real-text corpus (manual pages reduced to paragraphs), the one-line error of a corpus too
small for a config, and the scale study's plumbing."""

import gzip
import json
import math
from pathlib import Path

import pytest

from benchmarks.memorization.cli import main
from benchmarks.memorization.config import load_config
from benchmarks.memorization.manpages import MAN_ROOT, build, paragraphs
from benchmarks.memorization.scale import parse_models, point_config
from benchmarks.memorization.setting import build_setting

ROOT = Path(__file__).resolve().parents[3]
SMOKE = str(ROOT / "configs" / "smoke.yaml")

PAGE = r""".\" a comment
.de XX
.  this macro body \fBis\fR never text
..
.TH DEMO 1
.SH NAME
demo \- a program that is only a test of the reduction to running text
.SH SYNOPSIS
.B demo
[\fI\,OPTION\/\fR]... with enough words here to pass the length filter easily
.SH DESCRIPTION
.PP
The \fBdemo\fR program reads each \fIfile\fR in turn and writes a short summary of what it
found to the standard output, one line for every file.
.PP
Too short to keep.
.TP
\fB\-v\fR, \fB\-\-verbose\fR
explain in detail what is being done at every step, including the names of all the files read
.IP
{ x = 1; y = 2; z = 3; return x + y + z; } and many more words of code that look like a program
"""


def test_paragraphs_of_a_roff_page():
    got = list(paragraphs(PAGE, min_words=12))
    assert got == [
        "The demo program reads each file in turn and writes a short summary of what it found to the "
        "standard output, one line for every file.",
        "-v, --verbose explain in detail what is being done at every step, including the names of all "
        "the files read",
    ]


MDOC = r""".Dd January 1, 2020
.Sh NAME
.Nm frob
.Nd frobnicate files
.Sh SYNOPSIS
.Nm
.Op Fl v
.Ar file
with enough words after it to pass the length filter if it were not skipped here
.Sh DESCRIPTION
The
.Nm frob
utility reads each file \" an inline comment that is never text
and writes what it found to the standard output, in the order given.
.Pp
.SH
SEE ALSO
the words of a section named on the line after a bare section macro are never text either
"""


def test_paragraphs_of_mdoc_and_comments_and_bare_section_titles():
    assert list(paragraphs(MDOC, min_words=12)) == [
        "The frob utility reads each file and writes what it found to the standard output, in the order given."]


def test_build_dedups_skips_stubs_and_is_deterministic(tmp_path):
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    (man1 / "a.1.gz").write_bytes(gzip.compress(PAGE.encode()))
    (man1 / "b.1").write_text(PAGE)  # the same paragraphs again: kept once
    (man1 / "c.1").write_text(".so man1/a.1\n")
    (tmp_path / "man" / "man1" / "link.1.gz").symlink_to(man1 / "a.1.gz")
    counts = build(tmp_path / "one.jsonl", tmp_path / "man", min_words=12)
    assert counts == {"pages": 3, "paragraphs": 2, "words": 46}
    rows = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["page"] for r in rows] == ["a.1.gz", "a.1.gz"]
    build(tmp_path / "two.jsonl", tmp_path / "man", min_words=12)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    with pytest.raises(FileNotFoundError, match="no manual pages"):
        build(tmp_path / "x.jsonl", tmp_path / "nowhere")


@pytest.mark.skipif(not (MAN_ROOT / "man1").is_dir(), reason="no manual pages on this machine")
def test_the_machines_manual_pages_give_clean_paragraphs(tmp_path):
    counts = build(tmp_path / "man.jsonl", limit=300)
    texts = [json.loads(line)["text"] for line in (tmp_path / "man.jsonl").read_text().splitlines()]
    assert counts["paragraphs"] == len(texts) > 300
    assert not any("\\f" in t or "\\-" in t or t.startswith(".") for t in texts)


def test_a_corpus_too_small_names_the_setting_to_lower(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} about nothing much"}) for i in range(90)))
    cfg = load_config(SMOKE, [f"corpus.source={path}"])
    with pytest.raises(ValueError) as err:
        build_setting(cfg)
    message = str(err.value)
    assert "\n" not in message and "has 90 distinct documents but this config needs" in message
    steps = int(message.split("lower train.steps to at most ")[1].split(",")[0])
    build_setting(load_config(SMOKE, [f"corpus.source={path}", f"train.steps={steps}"]))  # the advice works
    with pytest.raises(ValueError, match="lower train.steps"):
        build_setting(load_config(SMOKE, [f"corpus.source={path}", f"train.steps={steps + 1}"]))


def test_scale_points_and_model_list():
    assert parse_models("2x64, 4x128") == [(2, 64), (4, 128)]
    for bad in ("4by128", "0x64", "4x"):
        with pytest.raises(ValueError, match="LAYERSxHIDDEN"):
            parse_models(bad)
    cfg = point_config(load_config(SMOKE), 4, 128, 4)
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.heads, cfg.model.mlp) == (4, 128, 4, 512)
    assert cfg.runs == ["standard", "memsinks"]


def test_scale_study_end_to_end(tmp_path):
    assert main(["scale", SMOKE, "--models", "1x32", "--mlp-ratios", "2,4", "--out", str(tmp_path)]) == 0
    points = json.loads((tmp_path / "scale.json").read_text())["points"]
    assert [(p["mlp_ratio"], p["hidden"] * p["mlp_ratio"]) for p in points] == [(2, 64), (4, 128)]
    assert points[0]["parameters"] < points[1]["parameters"]
    assert all(math.isfinite(p["gap_closure"]) and 0.5 < p["val_loss_ratio"] < 2 for p in points)
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "1x32-mlp4x" / "report.json").exists()
