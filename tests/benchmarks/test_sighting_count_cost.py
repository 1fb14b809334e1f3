"""benchmarks/sighting_count_cost.py runs and reports each shape (its timings are not asserted)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sighting_count_cost  # noqa: E402


def test_script_reports_every_shape(capsys):
    sighting_count_cost.main(["--seen", "12000", "--steps", "2", "--shapes", "2x16,3x8"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 2 x 16", "batch 3 x 8"]
    assert all("ms a step (12,000 documents counted before)" in line for line in lines)
