"""Everything ``import hf_memsinks`` changes outside its own objects, installed here and nowhere else.

1. huggingface_hub's upload methods (``HfApi.create_commit``, ``preupload_lfs_files``,
   ``upload_folder``, ``batch_bucket_files`` and their module-level aliases) pass every file through
   the sink check of :mod:`hf_memsinks.publishing.upload_gate` first
   (:mod:`hf_memsinks.publishing.hub_internals`): no upload path publishes sinks by accident.
2. Transformers' default ``Trainer`` callbacks (``transformers.trainer.DEFAULT_CALLBACKS``) gain
   :class:`~hf_memsinks.publishing.pushes.PushGuard` and
   :class:`~hf_memsinks.integrations.optimizer.SinkLRCallback`: every ``Trainer`` refuses to push a
   model with sinks before its first step, and applies ``MemSinkConfig.sink_lr_scale``.
3. PEFT's ``get_peft_model_state_dict`` adds the sinks that train beside an adapter to the adapter
   state (:mod:`hf_memsinks.integrations.adapter_files`): adapter files and ``Trainer`` checkpoints
   of a LoRA run keep the sinks it trained; its ``set_peft_model_state_dict`` warns when such an
   adapter is loaded into a model without sinks. Installed with the others when peft is imported by then
   (Transformers' ``Trainer`` imports it where it is installed); else :func:`hf_memsinks.train_sinks`,
   the one way sinks train beside an adapter, installs it where the upload gate is installed
   (:func:`hf_memsinks.integrations.adapter_files.hold_sinks_with_the_gate`), so
   ``import hf_memsinks`` itself never imports peft.

``hf_memsinks/__init__.py`` calls :func:`install` unless the environment has
``HF_MEMSINKS_GLOBAL_PATCHES=0``; :func:`uninstall` undoes all three (docs/publishing.md).
"""

from __future__ import annotations

import os
import sys

from .integrations.adapter_files import hold_sinks_in_adapters, release_adapters
from .integrations.optimizer import SinkLRCallback
from .publishing.hub_internals import gate_uploads, ungate_uploads, uploads_gated
from .publishing.pushes import PushGuard
from .publishing.upload_gate import check_upload
from .transformers_internals import add_default_trainer_callback, remove_default_trainer_callback

ENV = "HF_MEMSINKS_GLOBAL_PATCHES"
TRAINER_CALLBACKS = (PushGuard, SinkLRCallback)


def install() -> None:
    """Gate huggingface_hub's uploads, add the two Trainer callbacks, and keep sinks in PEFT's
    adapter state when peft is imported (again: no effect)."""
    gate_uploads(check_upload)
    for callback in TRAINER_CALLBACKS:
        add_default_trainer_callback(callback)
    if "peft" in sys.modules:
        hold_sinks_in_adapters()


def uninstall() -> None:
    """Restore huggingface_hub's methods and Transformers' default callbacks. Uploads are then not
    checked for sinks: run ``hf-memsinks audit DIRECTORY`` before publishing."""
    ungate_uploads()
    for callback in TRAINER_CALLBACKS:
        remove_default_trainer_callback(callback)
    release_adapters()


def installed() -> bool:
    """Whether the upload gate and the callbacks are in place (PEFT's: ``adapters_hold_sinks()``)."""
    from transformers import trainer

    return uploads_gated() and all(c in trainer.DEFAULT_CALLBACKS for c in TRAINER_CALLBACKS)


def install_on_import() -> None:
    if os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off"):
        install()
