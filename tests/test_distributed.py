"""Real two-process DDP on CPU (gloo): `accelerate launch` and `torchrun`, custom loop and Trainer.

Both ranks must build the same masks and end with the same weights; batches that activate no
sink (ID -1) or different sinks on each rank must not trip DDP's unused-parameter checks.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, how, out, checkpointing, *extra):
    port = str(free_port())
    if launcher == "accelerate":
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    cmd += [str(HERE / "ddp_worker.py"), str(out), how] + (["--checkpointing"] if checkpointing else []) + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("launcher,how,checkpointing", [
    ("accelerate", "accelerate", False),
    ("accelerate", "accelerate", True),
    ("accelerate", "trainer", True),
    ("torchrun", "trainer", False),
])
def test_two_processes_agree(tmp_path, launcher, how, checkpointing):
    r0, r1 = launch(launcher, how, tmp_path, checkpointing)
    assert r0["world"] == r1["world"] == 2
    assert torch.equal(r0["masks"], r1["masks"])
    assert r0["state"].keys() == r1["state"].keys()
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    moved = [n for n in r0["state"] if not torch.equal(r0["state"][n], r0["initial"][n])]
    assert any("c_fc" in n for n in moved) and any("c_proj" in n for n in moved)


def test_two_processes_count_every_sighting_alike(tmp_path):
    """general_sightings under DDP (Trainer, torchrun): each process counts both processes' IDs,
    so the tables and the routed weights agree; every labelled row is counted once."""
    r0, r1 = launch("torchrun", "trainer", tmp_path, False, "--sightings")
    t0, t1 = r0["sightings"], r1["sightings"]
    assert torch.equal(t0["ids"], t1["ids"]) and torch.equal(t0["counts"], t1["counts"])
    from ddp_worker import dataset

    labelled = [i for i in dataset()["sequence_ids"] if i >= 0]
    assert sorted(t0["ids"].tolist()) == sorted(set(labelled)) and int(t0["counts"].sum()) == len(labelled)
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name


def test_two_processes_switch_sinks_on_from_the_same_sighting(tmp_path):
    """sinks_from_sighting=2 under DDP (Trainer, torchrun): each process counts both processes' IDs,
    so both take the same rows' IDs away and end with the same weights; every labelled row counted once."""
    r0, r1 = launch("torchrun", "trainer", tmp_path, False, "--later-sinks")
    t0, t1 = r0["sightings"], r1["sightings"]
    assert torch.equal(t0["ids"], t1["ids"]) and torch.equal(t0["counts"], t1["counts"])
    from ddp_worker import dataset

    labelled = [i for i in dataset()["sequence_ids"] if i >= 0]
    assert int(t0["counts"].sum()) == len(labelled) and max(t0["counts"].tolist()) > 1  # (IDs seen again: sinks on)
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name


def test_two_processes_step_lora_sinks_by_the_rowwise_rule_alike(tmp_path):
    """sink_optimizer="rowwise" under DDP (Trainer, torchrun, LoRA): the rule steps the sinks (stored
    apart) on both processes from the averaged gradient, AdamW keeps no moments for them, and the ranks
    end equal with the sinks moved."""
    r0, r1 = launch("torchrun", "trainer", tmp_path, False, "--lora-rowwise")
    assert r0["rowwise"] and r1["rowwise"]
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    moved = [n for n in r0["state"] if not torch.equal(r0["state"][n], r0["initial"][n])]
    assert any(n.endswith("c_fc.sink_weight") for n in moved) and any(n.endswith("c_proj.sink_weight") for n in moved)
    assert any("lora_" in n for n in moved)


def test_fsdp_on_cpu_trains_and_exports_from_full_parameters(tmp_path):
    """FSDP2 (torch's fully_shard over gloo on CPU, launched by torchrun): decoder blocks are the
    FSDP units with their sinks inside; rank 0 gathers a full state dict, calls remove_sinks(),
    and the export is clean and loads as a plain GPT-2 of the general width."""
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "ddp_worker.py"), str(tmp_path), "fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    assert r0["world"] == 2
    assert any(not torch.equal(r0["state"][n], r0["initial"][n]) for n in r0["state"] if "c_fc" in n)
    sinks = torch.load(tmp_path / "sinks.pt")
    assert sinks and all(t.abs().sum() > 0 for t in sinks.values())

    from transformers import GPT2LMHeadModel

    from hf_memsinks.cli import audit

    assert audit(str(tmp_path / "clean")) == []
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "clean")
    assert plain.transformer.h[0].mlp.c_fc.weight.shape == (32, 32)  # general width only
