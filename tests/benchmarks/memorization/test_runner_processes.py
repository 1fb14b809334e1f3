"""The benchmark runner data-parallel: `accelerate launch` with 2 CPU processes (gloo) on the
smoke config gives the 1-process run's metrics, each process training on its half of every batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.memorization.training import global_batches, share

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")
TOLERANCE = 1e-5  # float summation order only (measured: 4.8e-7 at most over every metric)
AUC_TOLERANCE = 0.1  # a rank statistic: a near-tie that float order flips moves it by 1 / (members x controls)


def flat(metrics: dict, prefix: str = "") -> dict:
    """Nested metrics (mia_auc, exposure) as dotted keys; lists dropped."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            out[prefix + key] = value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_smoke(out: Path, processes: int, *overrides: str) -> dict:
    cli = ["-m", "benchmarks.memorization", "run", SMOKE, *overrides, "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("report.json, report.md") == 1  # the main process alone reports
    return json.loads((out / "report.json").read_text())


def test_two_processes_give_the_one_process_metrics(tmp_path):
    one, two = run_smoke(tmp_path / "one", 1), run_smoke(tmp_path / "two", 2)
    assert one["processes"]["count"] == 1 and two["processes"]["count"] == 2
    steps, batch = one["config"]["train"]["steps"], one["config"]["train"]["batch_size"]
    assert set(two["processes"]["shares"]) == set(one["curves"])
    for name, shares in two["processes"]["shares"].items():
        assert shares["documents"] == [steps * batch // 2] * 2, name
        assert sum(shares["tokens"]) == one["processes"]["shares"][name]["tokens"][0], name
        assert min(shares["tokens"]) > 0, name
    compared = 0
    for run, metrics in one["metrics"].items():
        other = flat(two["metrics"][run])
        for key, value in flat(metrics).items():
            tolerance = AUC_TOLERANCE if key.startswith(("mia_auc.", "exposure.")) else TOLERANCE
            assert other[key] == pytest.approx(value, abs=tolerance), (run, key)
            compared += 1
    for row_one, row_two in zip(one["forgetting"]["rows"], two["forgetting"]["rows"]):
        for key, value in row_one.items():
            if isinstance(value, float):
                assert row_two[key] == pytest.approx(value, abs=TOLERANCE), key
    assert compared > 100


def test_each_process_takes_its_contiguous_share_of_the_global_batch():
    stream = [[0] + list(range(1, 2 + i % 5)) for i in range(8)]
    batch = next(global_batches(stream, 8, pad_id=0, with_ids=True))
    parts = [share(batch, r, 4) for r in range(4)]
    for key in batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    assert parts[1]["input_ids"].shape == (2, batch["input_ids"].shape[1])  # padded with the whole batch
    with pytest.raises(ValueError, match="batch_size 8 does not split evenly over 3 processes"):
        share(batch, 0, 3)


def test_bf16_and_fp32_runs_share_a_process(tmp_path):
    """bf16 autocast trains (on the CPU too), evaluation stays fp32, and runs of different
    precisions follow each other in one process (accelerate's own mixed precision is per process)."""
    from benchmarks.memorization.config import load_config
    from benchmarks.memorization.runner import run

    reports = {p: run(load_config(SMOKE, [f"train.precision={p}", "runs=[standard,memsinks]"]), tmp_path / p)
               for p in ("bf16", "fp32")}
    assert [reports[p]["processes"]["precision"] for p in ("bf16", "fp32")] == ["bf16", "fp32"]
    for name in ("standard", "memsinks_removed", "memsinks_own_sinks"):
        bf16, fp32 = reports["bf16"]["metrics"][name]["val_loss"], reports["fp32"]["metrics"][name]["val_loss"]
        assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05), name
    assert reports["fp32"]["metrics"] == json.loads((tmp_path / "fp32" / "report.json").read_text())["metrics"]


def test_every_entry_point_gets_the_configured_threads():
    """`threads` is applied where every run, sweep and scale point starts: making the accelerator
    (a sweep with two threads beside a one-thread job ran 5x slower than alone)."""
    from benchmarks.memorization.config import load_config
    from benchmarks.memorization.training import make_accelerator

    before = torch.get_num_threads()
    try:
        make_accelerator(load_config(SMOKE, ["threads=1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
