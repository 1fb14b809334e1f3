"""The fine-tuning benchmark end to end on the smoke config (two seeds, every method), and its
config errors."""

import json
import math
import random
from pathlib import Path

import pytest

from benchmarks.memorization.cli import main
from benchmarks.memorization.finetune_config import load_finetune_config

ROOT = Path(__file__).resolve().parents[3]
SMOKE = str(ROOT / "configs" / "finetune_smoke.yaml")
WORDS = ("the option sets file mode of each directory when given prints value default list user process "
         "command output signal reads writes returns error flag").split()


def new_domain(path: Path, n: int = 400) -> str:
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_finetune_smoke_report(tmp_path, capsys):
    corpus = new_domain(tmp_path / "new.jsonl")
    assert main(["finetune", SMOKE, f"finetune.corpus.source={corpus}", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    names = {"pretrained", "full", "lora", "goldfish", "dedup", "memsinks", "lora+sinks"}
    assert set(report["runs"]) == names and [s["seed"] for s in report["seeds"]] == [0, 1]
    full = report["runs"]["full"]
    assert full["gap_closure"] == 0 and full["val_loss_ratio"] == 1 and full["step_time_ratio"] == 1
    for name in names - {"pretrained"}:
        run = report["runs"][name]
        for key in ("gap_closure", "gap_closure_natural", "gap_closure_canary", "val_loss_ratio",
                    "retention_loss_ratio", "extraction_rate", "step_time_ratio"):
            assert math.isfinite(run[key]), (name, key)
            assert len(run["per_seed"][key]) == 2
    assert report["runs"]["memsinks"]["extra_params"] > 0 and report["runs"]["full"]["extra_params"] == 0
    assert report["runs"]["lora"]["trainable_params"] < report["runs"]["full"]["trainable_params"]
    summary = report["summary"]
    assert summary["recipe"] == "memsinks"
    for key in ("gap_closure", "val_loss_ratio", "retention_loss_ratio", "trainable_params", "extra_params",
                "step_time_ratio"):
        assert summary[key] == report["runs"]["memsinks"][key]
    assert "| memsinks |" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("finetune.recipe=nope", "not one of the runs"),
    ("finetune.runs=[{name: a, method: sgd}]", "method must be one of"),
    ("finetune.runs=[{name: a, lr_scale: 2}]", "known keys"),
    ("finetune.replay=1.5", "replay"),
    ("finetune.runs=[{name: a, method: memsinks, memsinks: {sink_init: zeros}}]", "sink_init"),
    ("finetune.runs=[{name: a, method: memsinks, sink_optimizer: sgd}]", "sink_optimizer needs"),
    ("finetune.runs=[{name: a, sink_optimizer: rowwise}]", "sink_optimizer needs method memsinks"),
])
def test_finetune_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_finetune_config(SMOKE, [override, "finetune.reference=a"] if "runs=" in override else [override])


def test_secret_canaries_repeat_in_the_fine_tune_stream(tmp_path):
    """data.secret_canaries puts private records into the fine-tune (new-domain) stream like the other
    repeats, so the fine-tune's rows get the exposure test; their unseen twins never appear."""
    from benchmarks.memorization.two_domains import build_two_domains
    corpus = new_domain(tmp_path / "new.jsonl", n=1200)
    cfg = load_finetune_config(SMOKE, [f"finetune.corpus.source={corpus}", "data.secret_canaries=3",
                                       "data.max_length=48"])
    setting = build_two_domains(cfg)
    stream, dedup = [tuple(d) for d in setting.stream], [tuple(d) for d in setting.dedup_stream]
    assert len(setting.secrets.docs) == 3 and len(stream) == cfg.train.steps * cfg.train.batch_size
    for doc in setting.secrets.docs:
        assert stream.count(tuple(doc)) == cfg.data.repetitions and dedup.count(tuple(doc)) == 1
    for doc in setting.control_secrets.docs:
        assert tuple(doc) not in stream
