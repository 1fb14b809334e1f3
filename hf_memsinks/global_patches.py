"""Everything ``import hf_memsinks`` changes outside its own objects, installed here and nowhere else.

1. huggingface_hub's upload methods (``HfApi.create_commit``, ``preupload_lfs_files``,
   ``upload_folder``, ``batch_bucket_files`` and their module-level aliases) pass every file through
   the sink check of :mod:`hf_memsinks.publishing.upload_gate` first
   (:mod:`hf_memsinks.publishing.hub_internals`): no upload path publishes sinks by accident.
2. Transformers' default ``Trainer`` callbacks (``transformers.trainer.DEFAULT_CALLBACKS``) gain
   :class:`~hf_memsinks.publishing.pushes.PushGuard` and
   :class:`~hf_memsinks.integrations.optimizer.SinkLRCallback`: every ``Trainer`` refuses to push a
   model with sinks before its first step, and applies ``MemSinkConfig.sink_lr_scale``.

``hf_memsinks/__init__.py`` calls :func:`install` unless the environment has
``HF_MEMSINKS_GLOBAL_PATCHES=0``; :func:`uninstall` undoes both (docs/publishing.md).
"""

from __future__ import annotations

import os

from .integrations.optimizer import SinkLRCallback
from .publishing.hub_internals import gate_uploads, ungate_uploads, uploads_gated
from .publishing.pushes import PushGuard
from .publishing.upload_gate import check_upload
from .transformers_internals import add_default_trainer_callback, remove_default_trainer_callback

ENV = "HF_MEMSINKS_GLOBAL_PATCHES"
TRAINER_CALLBACKS = (PushGuard, SinkLRCallback)


def install() -> None:
    """Gate huggingface_hub's uploads and add the two Trainer callbacks (again: no effect)."""
    gate_uploads(check_upload)
    for callback in TRAINER_CALLBACKS:
        add_default_trainer_callback(callback)


def uninstall() -> None:
    """Restore huggingface_hub's methods and Transformers' default callbacks. Uploads are then not
    checked for sinks: run ``hf-memsinks audit DIRECTORY`` before publishing."""
    ungate_uploads()
    for callback in TRAINER_CALLBACKS:
        remove_default_trainer_callback(callback)


def installed() -> bool:
    """Whether both changes are in place."""
    from transformers import trainer

    return uploads_gated() and all(c in trainer.DEFAULT_CALLBACKS for c in TRAINER_CALLBACKS)


def install_on_import() -> None:
    if os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off"):
        install()
