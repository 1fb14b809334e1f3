"""``MemSinkCallback``: the Trainer's callback for a patched model. It logs the sink statistics
(:mod:`.statistics`), saves the audited sink-free export at the end of training, and makes it the only
model that ``push_to_hub=True`` publishes (:class:`hf_memsinks.publishing.pushes.PushTakeover`).

The plain ``Trainer`` needs nothing else: ``sequence_ids`` is a named forward argument, so the
default column filter keeps it, and the checkpoint format saves and restores sinks exactly. Every
``Trainer`` also gets two default callbacks (:mod:`hf_memsinks.global_patches`): the push guard
(:class:`hf_memsinks.publishing.pushes.PushGuard`) and the sinks' learning rate
(:class:`hf_memsinks.integrations.optimizer.SinkLRCallback`).
"""

from __future__ import annotations

import copy
import logging
import os

from transformers import TrainerCallback

from ..checkpoints.atomic import atomic_save
from ..ids.validation import check_sequence_ids
from ..publishing.audit import write_audited
from ..publishing.pushes import PushTakeover
from ..unwrap import unwrap
from .statistics import log_sink_statistics

logger = logging.getLogger(__name__)


class MemSinkCallback(TrainerCallback):
    """Log sink statistics with every Trainer log, and at the end of training save the sink-free
    model (``remove_sinks`` on a copy; the trained model keeps its sinks) to ``export_dir``.

    ``forget_ids``: export with every sink kept at its expected value except these IDs' sinks
    (see ``remove_sinks``). The tokenizer (``processing_class``) is saved alongside when given.
    The export is atomic (:func:`hf_memsinks.checkpoints.atomic.atomic_save`) and audited in its
    staging directory: files it does not write in ``export_dir`` are kept, a crash leaves the
    previous export loadable, and an export that fails the audit replaces nothing.

    With ``TrainingArguments(push_to_hub=True)`` the Trainer's own pushes (every ``hub_strategy``)
    would upload the sinks, so the callback takes them over when training starts: it switches them
    off and pushes only the audited export, once, at the end, to the Trainer's Hub repository.
    Without ``export_dir`` that is refused when training starts. ``allow_sinks_upload=
    hf_memsinks.SINKS_UPLOAD_CONSENT`` (with ``hub_private_repo=True``) keeps the Trainer's pushes,
    sinks included, to that private repository: to resume training elsewhere.
    """

    def __init__(self, export_dir: str | os.PathLike | None = None, forget_ids=None, log_statistics: bool = True,
                 allow_sinks_upload: str | None = None):
        self.export_dir = None if export_dir is None else os.fspath(export_dir)
        self.forget_ids = None if forget_ids is None else check_sequence_ids(forget_ids, "MemSinkCallback(forget_ids=)")
        self.log_statistics = log_statistics
        self.allow_sinks_upload = allow_sinks_upload
        self.pushes = PushTakeover(self.export_dir, allow_sinks_upload, "MemSinkCallback(allow_sinks_upload=)")

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self.log_statistics or model is None or logs is None or "loss" not in logs:
            return
        log_sink_statistics(model, state)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.export_dir is not None and state.is_world_process_zero:
            self._check_export_dir()  # fail before training, not after it
        self.pushes.begin(args, model)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        self.pushes.check_push(args, model)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        try:
            if self.export_dir is None or model is None or not state.is_world_process_zero:
                return
            self._check_export_dir()
            plain = copy.deepcopy(unwrap(model)).remove_sinks(self.forget_ids)

            def write(directory: str) -> None:
                plain.save_pretrained(directory)
                if processing_class is not None:
                    processing_class.save_pretrained(directory)

            atomic_save(self.export_dir, lambda d: write_audited(d, self.export_dir, write))
            logger.info("saved the sink-free model to %s", self.export_dir)
            self.pushes.push(args)
        finally:
            self.pushes.end()

    def _check_export_dir(self) -> None:
        d = self.export_dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise ValueError(f"MemSinkCallback(export_dir={d!r}) exists and is not a directory")
        if os.path.isdir(d) and any("memsink" in n.lower() for n in os.listdir(d)):
            raise ValueError(
                f"MemSinkCallback(export_dir={d!r}) holds a memsink checkpoint (memsink_config.json): the "
                "sink-free export would not be clean there; choose another directory"
            )
