"""benchmarks/bench.py's own mechanics: the in-step clock counts exactly our exclusive time,
and one measurement runs end to end at a tiny size (numbers from it are not asserted as speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402


class FakeTime:
    """perf_counter that only moves when a test says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_in_step_clock_counts_our_exclusive_time_only(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(bench, "time", fake)
    clock = bench.InStepClock()

    def theirs_leaf():
        fake.now += 5.0

    def ours_inner():
        fake.now += 1.0
        theirs()
        fake.now += 0.5

    def ours_outer():
        fake.now += 2.0
        inner()
        theirs()

    theirs = clock.wrap(theirs_leaf, ours=False)
    inner = clock.wrap(ours_inner, ours=True)
    outer = clock.wrap(ours_outer, ours=True, model_wrapper=True)
    shares = []
    clock.measured(lambda: (fake.__setattr__("now", fake.now + 10.0), outer()), shares)()
    # ours: outer's own 2.0 + inner's own 1.5; theirs: 5 + 5; untracked step work: 10
    assert clock.ours == 3.5
    assert clock.model_wrapper == 2.0
    assert shares == [3.5 / 23.5]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the GPU table's path (`make bench-gpu`), here on CPU
def test_one_measurement_runs_at_a_tiny_size(tmp_path, dtype):
    out = tmp_path / "one.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--part", "one:gpt2:tiny", "--reps", "2",
                    "--dtype", dtype, "--part-out", str(out)], check=True, capture_output=True)
    row = json.loads(out.read_text())
    assert set(row["step_ratio"]) == {"vanilla", "vanilla_copy", "memsinks", "memsinks_tok", "reference"}
    for kind in ("memsinks", "memsinks_tok"):
        assert 0 < row["in_step_share"][kind] < 1
        assert row["in_step_ratio"][kind] == 1 / (1 - row["in_step_share"][kind])
    mlp_excess = max(0.0, row["eval_mlp_ratio_drop_to_removed"] - 1)
    assert row["eval_ratio_bound"] == 1 + mlp_excess + row["eval_wrapper_share"]
    assert 0 < row["eval_wrapper_share"] < 1
    # exact byte counts (not time): per-sequence IDs save no activation-sized mask
    b, s = row["batch"], row["sinks"]
    assert row["saved_bytes"]["memsinks"] - row["saved_bytes"]["vanilla"] <= b * s
    assert row["saved_bytes"]["reference"] > row["saved_bytes"]["memsinks_tok"]
    print(bench.table({"rows": [row], "remove_sinks_gpt2_small": {"seconds": 0.0, "peak_extra_mib": None,
                                                                   "model_mib": 0.0}}))
