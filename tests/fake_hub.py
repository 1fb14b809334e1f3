"""A Hub that records instead of uploading: every push in the tests runs huggingface_hub's own code
down to its lowest steps, where the bytes would leave, and records them there instead:

- ``_commit_api._fetch_upload_modes`` (the preupload POST, which already sends each file's first
  512 bytes): binary files are LFS, the rest regular;
- the xet session (``get_xet_session``: every xet upload, of commits, of ``upload_folder``'s
  streamed path and of buckets) and the legacy LFS transfer (``lfs_upload``), which store content;
- ``_send_commit`` (the one POST of a commit, with the regular files inline), where the files of the
  commit are recorded with their safetensors tensor names;
- the ``/batch`` POST of a bucket.

xet is switched off for ``upload_folder`` (single-commit path) unless ``xet=True``; sockets refuse to
connect, so a path that slipped past the fakes fails instead of reaching the network."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from types import SimpleNamespace

import httpx2
import huggingface_hub
from huggingface_hub import HfApi, ModelCard, _commit_api, _upload_pipeline, hf_api
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import _xet

BETRAYING = (b".sink_weight", b".sink_bias", b".sink_gate_up_proj", b".sink_up_proj", b".sink_down_proj",
             b"sink_layout")


def _read(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if hasattr(source, "read"):
        position = source.tell()
        data = source.read()
        source.seek(position)
        return data
    with open(source, "rb") as f:
        return f.read()


def _tensor_names(source) -> list[str] | None:
    data = _read(source)
    if not data:  # freed by preupload_lfs_files(free_memory=True) after its upload
        return None
    length = struct.unpack("<Q", data[:8])[0]
    return sorted(k for k in json.loads(data[8:8 + length]) if k != "__metadata__")


@dataclass
class FakeHub:
    repos: dict = field(default_factory=dict)  # repo id -> private
    created: list = field(default_factory=list)  # (repo id, private asked for)
    commits: list = field(default_factory=list)  # {"repo_id", "files": {path: tensor names or None}}
    preuploads: list = field(default_factory=list)  # (repo id, path in repo): the 512-byte samples sent
    stored: list = field(default_factory=list)  # (where, name, content): every byte that left
    buckets: list = field(default_factory=list)  # {"bucket_id", "files": {path in the bucket: xet hash}}

    def leaks(self) -> list[str]:
        """What left that betrays sinks, read independently of the gate: the raw (or gunzipped) bytes."""
        out = []
        for where, name, data in self.stored:
            plain = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
            out += [f"{where}:{name}:{m.decode()}" for m in BETRAYING if m in plain]
        return out

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


class _XetHandle:
    def __init__(self, data: bytes):
        self.info = SimpleNamespace(xet_info=SimpleNamespace(hash=hashlib.sha256(b"xet" + data).hexdigest(),
                                                             sha256=hashlib.sha256(data).hexdigest(),
                                                             file_size=len(data)))

    def result(self):
        return self.info


class _XetCommit:
    def __init__(self, hub: FakeHub, where: str):
        self.hub, self.where = hub, where

    def start_upload_file(self, path, sha256=None):
        data = _read(path)
        self.hub.stored.append((self.where, os.path.basename(path), data))
        return _XetHandle(data)

    def start_upload_bytes(self, data, sha256=None, name=None):
        self.hub.stored.append((self.where, name or "<bytes>", bytes(data)))
        return _XetHandle(bytes(data))

    def wait_to_finish(self):
        pass

    def abort(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def intercept_hub(monkeypatch, existing: dict | None = None, xet: bool = False) -> FakeHub:
    """Install the fake Hub; ``existing``: repositories (and buckets) already there, ``{id: private}``;
    ``xet``: ``upload_folder`` takes its streamed xet path."""
    hub = FakeHub(repos=dict(existing or {}))

    def no_network(*args, **kwargs):
        raise RuntimeError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: xet)

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kw):
        repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"
        hub.created.append((repo_id, private))
        hub.repos.setdefault(repo_id, bool(private))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def repo_info(self, repo_id, *args, **kwargs):
        return SimpleNamespace(private=hub.repos[repo_id], sha="0" * 40)

    def fetch_upload_modes(additions, repo_type, repo_id, headers, revision, endpoint=None, **kw):
        assert repo_id in hub.repos, f"preupload to {repo_id}, which was never created"
        for op in additions:
            hub.preuploads.append((repo_id, op.path_in_repo))
            binary = b"\0" in op.upload_info.sample or op.upload_info.size > 10 << 20
            op._upload_mode = "lfs" if binary and op.upload_info.size else "regular"
            op._should_ignore, op._remote_oid = False, None

    def new_upload_commit(token_refresh_url="", **kw):
        return _XetCommit(hub, token_refresh_url.split("/api/")[-1].split("/xet-write-token")[0])

    def lfs_batch_info(upload_infos, repo_id, **kw):
        return [{"oid": info.sha256.hex(), "actions": {"upload": {}}} for info in upload_infos], [], None

    def lfs_upload(operation, **kw):
        with operation.as_file() as f:
            hub.stored.append((operation.path_in_repo, operation.path_in_repo, f.read()))

    def send_commit(*, operations, repo_id, commit_message, commit_description, **kw):
        assert repo_id in hub.repos, f"commit to {repo_id}, which was never created"
        added = [op for op in operations if hasattr(op, "path_or_fileobj")]
        files = {op.path_in_repo: (_tensor_names(op.path_or_fileobj) if op.path_in_repo.endswith(".safetensors")
                                   else None) for op in added}
        hub.stored += [(repo_id, op.path_in_repo, _read(op.path_or_fileobj)) for op in added
                       if op._upload_mode != "lfs"]  # LFS files were stored by their upload, regular ones travel here
        hub.commits.append({"repo_id": repo_id, "files": files, "message": commit_message})
        return hf_api.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                                 commit_message=commit_message, commit_description=commit_description or "",
                                 oid="0" * 40)

    load_card = ModelCard.load.__func__

    def no_card(cls, repo_id_or_path, *args, **kwargs):  # local cards load, the Hub has none
        if os.path.isfile(repo_id_or_path):
            return load_card(cls, repo_id_or_path, *args, **kwargs)
        raise EntryNotFoundError("no model card")

    real_backoff = hf_api.http_backoff

    def http_backoff(method, url, *args, content=None, **kwargs):
        if method != "POST" or "/api/buckets/" not in url or not url.endswith("/batch"):
            return real_backoff(method, url, *args, content=content, **kwargs)
        bucket_id = url.split("/api/buckets/")[1].removesuffix("/batch")
        assert bucket_id in hub.repos, f"upload to bucket {bucket_id}, which was never created"
        lines = [json.loads(line) for line in content.decode().splitlines() if line]
        hub.buckets.append({"bucket_id": bucket_id,
                            "files": {op["path"]: op["xetHash"] for op in lines if op["type"] == "addFile"}})
        return httpx2.Response(200, json={"failed": []}, request=httpx2.Request(method, url))

    def bucket_info(self, bucket_id, *args, **kwargs):
        return SimpleNamespace(id=bucket_id, private=hub.repos[bucket_id], total_files=0)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(HfApi, "bucket_info", bucket_info)
    monkeypatch.setattr(HfApi, "list_bucket_tree", lambda self, *a, **k: iter(()))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *a, **k: None)
    for module in (_commit_api, _upload_pipeline):
        monkeypatch.setattr(module, "_fetch_upload_modes", fetch_upload_modes)
        monkeypatch.setattr(module, "_send_commit", send_commit)
    monkeypatch.setattr(_commit_api, "post_lfs_batch_info", lfs_batch_info)
    monkeypatch.setattr(_commit_api, "lfs_upload", lfs_upload)
    fake_session = SimpleNamespace(new_upload_commit=new_upload_commit)
    monkeypatch.setattr(_xet, "get_xet_session", lambda: fake_session)
    monkeypatch.setattr(_upload_pipeline, "get_xet_session", lambda: fake_session)
    monkeypatch.setattr(hf_api, "http_backoff", http_backoff)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_card))
    for name in ("create_commit", "preupload_lfs_files", "upload_folder", "batch_bucket_files"):
        assert getattr(getattr(huggingface_hub.HfApi, name), "_memsink_gate", False), f"the gate on {name} is missing"
    return hub
