"""``hf-memsinks install-hook``: the git pre-push hook refuses a push that would carry sinks (in any
pushed commit, under any name, as a Git LFS object), keeps a pre-push hook already there, and lets
a sink-free push through. The remote is a local bare repository: no network."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model
from hf_memsinks.cli import main
from hf_memsinks.publishing.git_hook import CHAINED

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repos(tmp_path, monkeypatch):
    """A work tree whose ``origin`` is a bare repository, with git's config isolated from the machine's,
    and a checkpoint with sinks and its sink-free model."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    for args in (["config", "user.email", "me@example.com"], ["config", "user.name", "me"],
                 ["remote", "add", "origin", str(remote)]):
        git(work, *args)
    torch.manual_seed(0)
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sink_fraction=0.5))
    model.save_pretrained(tmp_path / "ckpt")
    model.remove_sinks().save_pretrained(tmp_path / "clean")
    return work, remote, tmp_path / "ckpt", tmp_path / "clean"


def git(repo, *args, check=True):
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc


def commit(work, files: dict, message: str):
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", message)


def folder(path: Path, prefix: str) -> dict:
    return {f"{prefix}/{p.name}": p.read_bytes() for p in path.iterdir()}


def on_remote(remote, branch) -> bool:
    return git(remote, "rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False).returncode == 0


def test_the_hook_refuses_pushes_with_sinks_keeps_the_hook_before_it_and_lets_the_export_through(repos):
    work, remote, ckpt, clean = repos
    hooks = work / ".git" / "hooks"
    (hooks / "pre-push").write_text('#!/bin/sh\ncat > "$(dirname "$0")/../chained-input"\necho "$1" > '
                                    '"$(dirname "$0")/../chained-args"\n')  # as Git LFS's would be
    (hooks / "pre-push").chmod(0o755)
    for _ in range(2):  # installing again rewrites only its own hook
        assert main(["install-hook", str(work)]) == 0
    assert "hf-memsinks" in (hooks / "pre-push").read_text() and "cat >" in (hooks / CHAINED).read_text()

    commit(work, folder(ckpt, "model"), "checkpoint with sinks")
    push = git(work, "push", "origin", "main", check=False)
    assert push.returncode != 0 and "push refused" in push.stderr, push.stderr
    assert "model/model.safetensors (sink tensors transformer.h.0.mlp" in push.stderr
    assert "model/memsink_config.json (memsink metadata)" in push.stderr and not on_remote(remote, "main")

    git(work, "rm", "-q", "-r", "model")
    commit(work, folder(clean, "model"), "the export instead")  # the sinks are still in the pushed history
    push = git(work, "push", "origin", "main", check=False)
    assert push.returncode != 0 and "model/memsink_config.json" in push.stderr and not on_remote(remote, "main")
    assert not (work / ".git" / "chained-input").exists()  # a refused push stops before the hook after it

    git(work, "checkout", "-q", "--orphan", "clean")
    git(work, "rm", "-q", "-r", "--cached", ".")
    commit(work, folder(clean, "model"), "sink-free model")
    assert git(work, "push", "-q", "origin", "clean", check=False).returncode == 0 and on_remote(remote, "clean")
    assert (work / ".git" / "chained-input").read_text().startswith("refs/heads/clean ")  # its stdin, forwarded
    assert (work / ".git" / "chained-args").read_text().strip() == "origin"

    data = (ckpt / "model.safetensors").read_bytes()  # renamed, and kept by Git LFS: judged by its local object
    oid = hashlib.sha256(data).hexdigest()
    objects = work / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4]
    objects.mkdir(parents=True)
    (objects / oid).write_bytes(data)

    def pointer(sha, size):
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()

    commit(work, {"weights.st": pointer(oid, len(data)), "extra.bin": pointer("f" * 64, 10)}, "lfs")
    push = git(work, "push", "origin", "clean", check=False)
    assert push.returncode != 0 and "weights.st (sink tensors" in push.stderr, push.stderr
    assert "extra.bin (unreadable" in push.stderr and "Git LFS object ffffffffffff is not in this clone" in push.stderr
    assert git(remote, "rev-parse", "refs/heads/clean").stdout == git(work, "rev-parse", "clean~1").stdout
