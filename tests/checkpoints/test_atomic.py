"""Nothing lost: a save killed at any point (SIGKILL in a child process) leaves a loadable checkpoint.

Each child overwrites an existing checkpoint (or export) that also holds an unrelated file, with a
model of *other* sink settings, and kills itself at one point of the save. Before the commit
point the old checkpoint must load exactly as before; after it, the new one. The unrelated file
survives every time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_checkpoints import trained
from tiny_models import batch, tiny_model
from transformers import AutoModelForCausalLM

from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, get_memsink_model
from hf_memsinks.checkpoints import atomic as saving
from hf_memsinks.cli import main

ROOT = Path(__file__).resolve().parents[2]
OLD_CFG = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4)

CHILD = textwrap.dedent(r"""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    mode, point, source, target = sys.argv[1:5]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def half_written_then_die(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
        die()

    import torch
    import transformers.modeling_utils as modeling_utils
    from hf_memsinks import MemSinkConfig, get_memsink_model
    from hf_memsinks.checkpoints import atomic as saving
    from hf_memsinks.checkpoints import format as checkpoint_format
    from tiny_models import tiny_model

    if point == "weights":
        modeling_utils.safe_save_file = half_written_then_die
    elif point == "memsink_config":
        def config_then_die(directory, config, record):
            with open(os.path.join(directory, "memsink_config.json"), "w") as f:
                f.write('{{"sink_fraction": ')
            die()
        checkpoint_format.save_checkpoint_config = config_then_die
    elif point == "before_exchange":
        saving._exchange = die
    elif point == "after_exchange":
        saving._sweep_old = die

    if mode == "save":
        new = get_memsink_model(tiny_model("gpt2", seed=5), MemSinkConfig(sink_fraction=0.5))
        new.save_pretrained(target)
    elif mode == "export":
        from hf_memsinks.cli import main
        main(["export", source, target, "--overwrite"])
    elif mode == "callback":
        from transformers import Trainer, TrainingArguments
        from hf_memsinks.integrations.trainer import MemSinkCallback
        model = get_memsink_model(tiny_model("gpt2", seed=5), MemSinkConfig(sink_fraction=0.5))
        rows = [{{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "sequence_ids": i}} for i in range(4)]
        args = TrainingArguments(output_dir=os.path.join(source, "run"), max_steps=1, per_device_train_batch_size=2,
                                 report_to=[], use_cpu=True, save_strategy="no")
        collate = lambda b: {{k: torch.tensor([r[k] for r in b]) for k in b[0]}}
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                callbacks=[MemSinkCallback(export_dir=target)]).train()
    sys.exit(3)  # the kill point was never reached
""")


def run_child(tmp_path: Path, mode: str, point: str, source: Path | str, target: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(script), mode, point, str(source), str(target)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch()).logits


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("old") / "ckpt"
    model = trained("gpt2", OLD_CFG)
    model.save_pretrained(path)
    return path, logits(model)


def new_model_logits():
    return logits(get_memsink_model(tiny_model("gpt2", seed=5), MemSinkConfig(sink_fraction=0.5)))


@pytest.mark.parametrize("point", ["memsink_config", "weights", "before_exchange", "after_exchange"])
def test_save_pretrained_killed_midway_leaves_a_loadable_checkpoint(tmp_path, old_checkpoint, point):
    source, old_logits = old_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    (target / "notes.txt").write_text("not written by any save")
    run_child(tmp_path, "save", point, "-", target)
    loaded = AutoMemSinkModelForCausalLM.from_pretrained(target)
    expected = new_model_logits() if point == "after_exchange" else old_logits
    assert torch.equal(logits(loaded), expected)
    assert (target / "notes.txt").read_text() == "not written by any save"
    leftovers = [p for p in tmp_path.iterdir() if saving.STAGING_MARK in p.name]
    if point == "after_exchange":  # the old tree waits next to the target: nothing deleted
        assert len(leftovers) == 1 and (leftovers[0] / "memsink_config.json").exists()


@pytest.mark.parametrize("point", ["weights", "before_exchange"])
def test_export_killed_midway_leaves_the_previous_export(tmp_path, old_checkpoint, point):
    source, old_logits = old_checkpoint
    out = tmp_path / "export"
    assert main(["export", str(source), str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    new_ckpt = tmp_path / "new"
    get_memsink_model(tiny_model("gpt2", seed=5), MemSinkConfig(sink_fraction=0.5)).save_pretrained(new_ckpt)
    run_child(tmp_path, "export", point, new_ckpt, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (logits(AutoModelForCausalLM.from_pretrained(out)) - old_logits).abs().max() < 1e-5


def test_trainer_callback_export_killed_midway_leaves_the_previous_export(tmp_path, old_checkpoint):
    source, old_logits = old_checkpoint
    out = tmp_path / "export"
    assert main(["export", str(source), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_child(tmp_path, "callback", "weights", tmp_path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (logits(AutoModelForCausalLM.from_pretrained(out)) - old_logits).abs().max() < 1e-5


def test_save_without_directory_exchange_replaces_files_and_keeps_others(tmp_path, old_checkpoint, monkeypatch):
    """Where the atomic exchange is unavailable, files are replaced one by one; others are kept."""
    source, _ = old_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    (target / "notes.txt").write_text("mine")
    monkeypatch.setattr(saving, "_renameat2_exchange", lambda a, b: False)
    new = get_memsink_model(tiny_model("gpt2", seed=5), MemSinkConfig(sink_fraction=0.5))
    new.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert torch.equal(logits(AutoMemSinkModelForCausalLM.from_pretrained(target)), logits(new))
    assert not [p for p in tmp_path.iterdir() if saving.STAGING_MARK in p.name]


def test_resharded_save_does_not_leave_old_weights_in_front(tmp_path, old_checkpoint):
    """A sharded save over a single-file checkpoint: the old model.safetensors (which loaders
    prefer) is superseded, subdirectories and other files are kept."""
    source, _ = old_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    (target / "sub").mkdir()
    (target / "sub" / "keep.txt").write_text("mine")
    new = get_memsink_model(tiny_model("gpt2", seed=5), MemSinkConfig(sink_fraction=0.5))
    new.save_pretrained(target, max_shard_size="20KB")
    assert not (target / "model.safetensors").exists() and (target / "model.safetensors.index.json").exists()
    assert (target / "sub" / "keep.txt").read_text() == "mine"
    assert torch.equal(logits(AutoMemSinkModelForCausalLM.from_pretrained(target)), logits(new))
