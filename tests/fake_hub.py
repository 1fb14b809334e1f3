"""A Hub that records instead of uploading: every push in the tests runs huggingface_hub's own code
down to its commit step (``_commit_api._send_commit``, the one POST of a commit), where the files that would be
uploaded are recorded with their safetensors tensor names. xet is switched off so that
``upload_folder`` takes the single-commit path; sockets refuse to connect, so a path that slipped
past the fakes fails instead of reaching the network."""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass, field
from types import SimpleNamespace

import huggingface_hub
from huggingface_hub import HfApi, ModelCard, _commit_api, hf_api
from huggingface_hub.errors import EntryNotFoundError


def _tensor_names(source) -> list[str] | None:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    length = struct.unpack("<Q", data[:8])[0]
    return sorted(k for k in json.loads(data[8:8 + length]) if k != "__metadata__")


@dataclass
class FakeHub:
    repos: dict = field(default_factory=dict)  # repo id -> private
    created: list = field(default_factory=list)  # (repo id, private asked for)
    commits: list = field(default_factory=list)  # {"repo_id", "files": {path: tensor names or None}}

    def files(self, repo_id: str | None = None) -> dict:
        out = {}
        for c in self.commits:
            if repo_id is None or c["repo_id"] == repo_id:
                out.update(c["files"])
        return out

    def sink_tensors(self, repo_id: str | None = None) -> list[str]:
        return [f"{p}:{k}" for p, keys in self.files(repo_id).items() for k in keys or [] if ".sink_" in k]

    def memsink_files(self, repo_id: str | None = None) -> list[str]:
        return [p for p in self.files(repo_id) if "memsink" in os.path.basename(p).lower()]


def intercept_hub(monkeypatch, existing: dict | None = None) -> FakeHub:
    """Install the fake Hub; ``existing``: repositories already there, ``{repo_id: private}``."""
    hub = FakeHub(repos=dict(existing or {}))

    def no_network(*args, **kwargs):
        raise RuntimeError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kw):
        repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"
        hub.created.append((repo_id, private))
        hub.repos.setdefault(repo_id, bool(private))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def repo_info(self, repo_id, *args, **kwargs):
        return SimpleNamespace(private=hub.repos[repo_id], sha="0" * 40)

    def send_commit(*, operations, repo_id, commit_message, commit_description, **kw):
        assert repo_id in hub.repos, f"commit to {repo_id}, which was never created"
        files = {op.path_in_repo: (_tensor_names(op.path_or_fileobj) if op.path_in_repo.endswith(".safetensors")
                                   else None) for op in operations if hasattr(op, "path_or_fileobj")}
        hub.commits.append({"repo_id": repo_id, "files": files, "message": commit_message})
        return hf_api.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                                 commit_message=commit_message, commit_description=commit_description or "",
                                 oid="0" * 40)

    load_card = ModelCard.load.__func__

    def no_card(cls, repo_id_or_path, *args, **kwargs):  # local cards load, the Hub has none
        if os.path.isfile(repo_id_or_path):
            return load_card(cls, repo_id_or_path, *args, **kwargs)
        raise EntryNotFoundError("no model card")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *a, **k: None)
    monkeypatch.setattr(_commit_api, "_send_commit", send_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_card))
    assert getattr(huggingface_hub.HfApi.create_commit, "_memsink_gate", False), "hf_memsinks' upload gate is missing"
    return hub
