"""Every method of huggingface_hub that hf_memsinks wraps, in one place (as
:mod:`hf_memsinks.transformers_internals` for Transformers): the upload entry points, so that a
check sees every file before a byte is sent: the upload gate (:mod:`.upload_gate`).
:mod:`hf_memsinks.global_patches` installs it."""

from __future__ import annotations

import functools
import os

# Every upload of huggingface_hub goes through one of these before it sends a byte: upload_file and
# every push through create_commit, which preuploads through preupload_lfs_files (the one method that
# sends LFS/xet content for commits); upload_folder's streamed xet path skips both; every bucket
# upload (sync_bucket, HfFileSystem on buckets) goes through batch_bucket_files.
_GATED = ("create_commit", "preupload_lfs_files", "upload_folder", "batch_bucket_files")
_PASSED = "_memsink_gate_passed"  # set on a CommitOperationAdd: the (repo type, repo) it was let through to


def _folder_files(folder, path_in_repo, allow_patterns, ignore_patterns) -> list[tuple[str, str]]:
    """What ``upload_folder`` would send, as (path in repo, local path), by its own pattern filter."""
    from huggingface_hub.utils import filter_repo_objects

    folder = os.fspath(folder)
    relative = [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/")
                for root, _, names in os.walk(folder) for n in names]
    kept = filter_repo_objects(relative, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    prefix = (path_in_repo or "").strip("/")
    return [(f"{prefix}/{rel}" if prefix else rel, os.path.join(folder, rel)) for rel in kept]


def _bucket_files(add) -> list[tuple[str, object]]:
    """``batch_bucket_files(add=...)`` items, ``(source, destination)`` tuples or its own add
    operations, as (path in the bucket, local path or bytes)."""
    return [(item.destination, item.source) if hasattr(item, "source") else (item[1], item[0]) for item in add]


def gate_uploads(check) -> None:
    """Put ``check(api, repo_id, repo_type, token, files, what)`` in front of ``HfApi``'s upload
    entry points (synchronously, also for ``run_as_future=True``), and rebind huggingface_hub's
    module-level aliases of them. ``files`` is a list of (path in repo, local path, bytes or file
    object); ``repo_type`` is ``"bucket"`` for a bucket. A commit operation let through is marked
    with its destination, so that ``create_commit``'s own call of ``preupload_lfs_files`` (or a
    commit of operations preuploaded before) does not read it again."""
    import huggingface_hub
    from huggingface_hub import HfApi, hf_api

    if getattr(HfApi.create_commit, "_memsink_gate", False):
        return
    originals = {name: getattr(HfApi, name) for name in _GATED}

    def gated_operations(self, repo_id, operations, kwargs, what):
        target = (kwargs.get("repo_type") or "model", repo_id)
        fresh = [op for op in operations if hasattr(op, "path_or_fileobj") and getattr(op, _PASSED, None) != target]
        check(self, repo_id, kwargs.get("repo_type"), kwargs.get("token"),
              [(op.path_in_repo, op.path_or_fileobj) for op in fresh], what)
        for op in fresh:
            setattr(op, _PASSED, target)

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)  # (an iterator would be used up by the check)
        gated_operations(self, repo_id, operations, kwargs, "create_commit")
        return originals["create_commit"](self, repo_id=repo_id, operations=operations, **kwargs)

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        additions = list(additions)
        gated_operations(self, repo_id, additions, kwargs, "preupload_lfs_files")
        return originals["preupload_lfs_files"](self, repo_id=repo_id, additions=additions, **kwargs)

    def upload_folder(self, *args, **kwargs):
        files = _folder_files(kwargs["folder_path"], kwargs.get("path_in_repo"), kwargs.get("allow_patterns"),
                              kwargs.get("ignore_patterns"))
        check(self, kwargs["repo_id"], kwargs.get("repo_type"), kwargs.get("token"), files, "upload_folder")
        return originals["upload_folder"](self, *args, **kwargs)

    def batch_bucket_files(self, bucket_id, **kwargs):
        if kwargs.get("add"):
            kwargs["add"] = list(kwargs["add"])
            check(self, bucket_id, "bucket", kwargs.get("token"), _bucket_files(kwargs["add"]), "batch_bucket_files")
        return originals["batch_bucket_files"](self, bucket_id, **kwargs)

    for name, gated in zip(_GATED, (create_commit, preupload_lfs_files, upload_folder, batch_bucket_files)):
        functools.update_wrapper(gated, originals[name])
        gated._memsink_gate = True
        setattr(HfApi, name, gated)
        setattr(hf_api, name, getattr(hf_api.api, name))
        if name in vars(huggingface_hub):
            setattr(huggingface_hub, name, getattr(hf_api.api, name))


def ungate_uploads() -> None:
    """Undo :func:`gate_uploads`: ``HfApi``'s own methods and module-level aliases again."""
    import huggingface_hub
    from huggingface_hub import HfApi, hf_api

    for name in _GATED:
        method = getattr(HfApi, name)
        if getattr(method, "_memsink_gate", False):
            setattr(HfApi, name, method.__wrapped__)
            setattr(hf_api, name, getattr(hf_api.api, name))
            if name in vars(huggingface_hub):
                setattr(huggingface_hub, name, getattr(hf_api.api, name))


def uploads_gated() -> bool:
    from huggingface_hub import HfApi

    return all(getattr(getattr(HfApi, name), "_memsink_gate", False) for name in _GATED)

