"""Every private name of Transformers that hf_memsinks uses, in one place.

Transformers changes its internals between releases without notice; keeping them here means an
upgrade breaks in this module alone, and :func:`check_transformers_version` (run by the tests)
names the releases these names were checked against. The supported range is in ``setup.cfg``.
"""

from __future__ import annotations

import functools
import os

import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer
from transformers.utils import cached_file

__all__ = ["Conv1D", "TESTED_VERSIONS", "causal_lm_class", "check_transformers_version", "class_ignoring_unexpected",
           "experts_forward", "get_checkpoint_func", "hub_file", "set_checkpoint_func", "ExpertsGateHook",
           "CheckpointingHook", "add_default_trainer_callback", "gate_hub_uploads"]

# major.minor releases the internals below were checked against (the whole test suite passed).
TESTED_VERSIONS = ("5.24",)


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Raise if ``version`` is not a release these internals were tested with."""
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_VERSIONS:
        raise RuntimeError(
            f"hf_memsinks was tested with transformers {', '.join(TESTED_VERSIONS)}, not {version}: check every "
            "name in hf_memsinks/transformers_internals.py against it, then add it to TESTED_VERSIONS"
        )


# ---- loading ----------------------------------------------------------------------------------------


def hub_file(path: str, filename: str, offline_is_missing: bool = True, **hub_kwargs) -> str | None:
    """The local path of ``filename`` in a Hub repository (downloaded if needed), or None when the
    repository has no such file (or, with ``offline_is_missing``, cannot be reached)."""
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=not offline_is_missing, **hub_kwargs)


def hub_file_or_raise(path: str, filename: str, **hub_kwargs) -> str:
    """As :func:`hub_file`, but a missing file is Transformers' own error."""
    return cached_file(path, filename, **hub_kwargs)


def causal_lm_class(config: PretrainedConfig) -> type | None:
    """The class ``AutoModelForCausalLM`` builds for ``config``, or None for a remote-code model."""
    mapping = AutoModelForCausalLM._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


def class_ignoring_unexpected(base: type, patterns: list[str]) -> type:
    """A subclass of ``base`` (same name and module) whose ``from_pretrained`` does not report
    unused checkpoint keys matching ``patterns`` (regular expressions)."""
    return type(base.__name__, (base,), {
        "_keys_to_ignore_on_load_unexpected": list(base._keys_to_ignore_on_load_unexpected or []) + patterns,
        "__module__": base.__module__,
    })


# ---- mixture-of-experts modules ---------------------------------------------------------------------


def experts_forward(module):
    """Transformers' own experts function for ``module``: ``grouped_mm`` when that is the model's
    experts implementation (rows sorted by expert), else ``batched_mm`` (rows in token order).
    Returns ``(function, grouped)``."""
    from transformers.integrations import moe

    grouped = getattr(module.config, "_experts_implementation", None) == "grouped_mm"
    return (moe.grouped_mm_experts_forward if grouped else moe.batched_mm_experts_forward), grouped


class ExpertsGateHook:
    """Mixed in ahead of a gated experts module's class: the experts functions call
    ``_apply_gate`` on the gate/up output; the hidden neurons it returns go through
    ``self.after_gate`` (which the mixin's user defines)."""

    def _apply_gate(self, gate_up):
        return self.after_gate(super()._apply_gate(gate_up))


# ---- activation checkpointing -----------------------------------------------------------------------


def get_checkpoint_func(module):
    """The checkpoint function Transformers set on a layer with checkpointing on, or None."""
    return getattr(module, "_gradient_checkpointing_func", None)


def set_checkpoint_func(module, func) -> None:
    module._gradient_checkpointing_func = func


class CheckpointingHook:
    """Mixed in ahead of a model class: ``gradient_checkpointing_enable()`` passes its checkpoint
    function through ``self.wrap_checkpoint_func`` (which the mixin's user defines)."""

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        func = self.wrap_checkpoint_func(gradient_checkpointing_func)
        return super()._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=func, **kwargs)


# ---- Trainer ----------------------------------------------------------------------------------------


def add_default_trainer_callback(callback: type) -> None:
    """Every ``Trainer`` built from now on gets an instance of ``callback``, as it gets its own
    ``DefaultFlowCallback``."""
    from transformers import trainer

    if callback not in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.append(callback)


# ---- uploads ----------------------------------------------------------------------------------------

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


def gate_hub_uploads(check) -> None:
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


def loaded_from_checkpoint(model) -> bool:
    """Whether ``from_pretrained`` loaded any of the model's weights: its loader marks the parameters
    it fills (``_is_hf_initialized``); ``from_config`` leaves them unmarked even when the config came
    from a checkpoint (a copy with ``copy.deepcopy`` loses the marks too)."""
    return any(getattr(p, "_is_hf_initialized", False) for p in model.parameters())
