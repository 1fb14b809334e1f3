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


def test_in_step_alternates_the_counting_on_one_model():
    result = sighting_count_cost.step_ratio("tiny", pairs=3, batch=2, seq=8)
    assert result["shape"] == "tiny" and len(result["ratios"]) == 3
    assert result["ratio"] == sorted(result["ratios"])[1] and all(r > 0 for r in result["ratios"])
