"""A ``TrainerCallback``: sink statistics in the training logs, the sink-free export at the end,
and the only model that ``push_to_hub=True`` publishes; and two callbacks every ``Trainer`` gets
(:mod:`hf_memsinks.global_patches` adds them to Transformers' defaults): the push guard and the
sinks' learning rate.

The plain ``Trainer`` needs nothing else: ``sequence_ids`` is a named forward argument, so the
default column filter keeps it, and the checkpoint format saves and restores sinks exactly.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..checkpoints.atomic import atomic_save
from ..checkpoints.upload_gate import SinkUploadError, check_consent, holds_sinks, is_permitted, permit, refusal, revoke
from ..export import write_audited
from ..ids.validation import check_sequence_ids
from ..layers.projections import is_patched_projection
from ..unwrap import unwrap
from .optimizer import attach_sink_lr

logger = logging.getLogger(__name__)


def sink_statistics(model) -> dict[str, float]:
    """Norms of the general and sink parts of every patched projection, summed over layers.

    A sink norm that grows faster than the general one means the sinks are absorbing what the
    batches carry; a flat sink norm means no IDs reach the model.
    """
    general = sinks = 0.0
    count = 0
    with torch.no_grad():
        for module in unwrap(model).modules():
            if is_patched_projection(module) and module.memsink.role != "norm":
                g, s = module.general_and_sink_parts()["weight"]
                general += float(g.float().pow(2).sum())
                sinks += float(s.float().pow(2).sum())
                count += 1
    if count == 0:
        return {}
    general, sinks = general ** 0.5, sinks ** 0.5
    return {"memsink/general_weight_norm": general, "memsink/sink_weight_norm": sinks,
            "memsink/sink_to_general_norm": sinks / max(general, 1e-12)}


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
        if allow_sinks_upload is not None:
            check_consent(allow_sinks_upload, "MemSinkCallback(allow_sinks_upload=)")
        self.allow_sinks_upload = allow_sinks_upload
        self._push_export = False  # whether the export replaces the Trainer's pushes
        self._permitted = None  # the repository allow_sinks_upload opened while training

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self.log_statistics or model is None or logs is None or "loss" not in logs:
            return
        stats = sink_statistics(model)
        if stats and state.is_world_process_zero:
            state.log_history.append({**{k: round(v, 4) for k, v in stats.items()}, "step": state.global_step})
            logger.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.export_dir is not None and state.is_world_process_zero:
            self._check_export_dir()  # fail before training, not after it
        if args.push_to_hub and holds_sinks(model):
            self._take_over_pushes(args)

    def _take_over_pushes(self, args) -> None:
        repo = args.hub_model_id or Path(args.output_dir).absolute().name
        if self.allow_sinks_upload is not None:
            if not args.hub_private_repo:
                raise SinkUploadError("MemSinkCallback(allow_sinks_upload=...) uploads the sinks to private "
                                      "repositories only: set TrainingArguments(hub_private_repo=True)")
            if self._permitted is None:
                permit(repo)
                self._permitted = repo
            return
        if self.export_dir is None:
            raise refusal(f"TrainingArguments(push_to_hub=True, hub_strategy={str(args.hub_strategy)!r}) of a "
                          "model that still has sinks", ["the model weights with their sink tensors at every push"])
        args.push_to_hub = False  # the Trainer's pushes carry the sinks: the export is pushed instead
        self._push_export = True
        logger.warning("MemSinkCallback: the Trainer's pushes to %s are off; the audited sink-free export in %s "
                       "will be pushed there at the end of training", repo, self.export_dir)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        repo = args.hub_model_id or Path(args.output_dir).absolute().name
        if holds_sinks(model) and not is_permitted(repo):
            raise refusal(f"Trainer.push_to_hub() to {repo} of a model that still has sinks"
                          + (" (MemSinkCallback pushes the sink-free export at the end of training)"
                             if self._push_export else ""), ["the model weights with their sink tensors"])

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
            if self._push_export:
                self._push(args)
        finally:
            if self._permitted is not None:
                revoke(self._permitted)
                self._permitted = None

    def _push(self, args) -> None:
        from huggingface_hub import HfApi

        api = HfApi()
        repo = args.hub_model_id or Path(args.output_dir).absolute().name
        repo_id = api.create_repo(repo, private=args.hub_private_repo, token=args.hub_token, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=self.export_dir, token=args.hub_token,
                          revision=args.hub_revision, commit_message="Sink-free export (hf_memsinks)")
        logger.info("pushed the sink-free export in %s to %s", self.export_dir, repo_id)

    def _check_export_dir(self) -> None:
        d = self.export_dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise ValueError(f"MemSinkCallback(export_dir={d!r}) exists and is not a directory")
        if os.path.isdir(d) and any("memsink" in n.lower() for n in os.listdir(d)):
            raise ValueError(
                f"MemSinkCallback(export_dir={d!r}) holds a memsink checkpoint (memsink_config.json): the "
                "sink-free export would not be clean there; choose another directory"
            )


class PushGuard(TrainerCallback):
    """In every ``Trainer``: a run with ``push_to_hub=True`` whose model still has sinks stops
    before its first step, not at its first push (after the first save). ``MemSinkCallback``
    turns such pushes into the export's, or opts the repository in, in its own
    ``on_train_begin``, which runs before this check."""

    def __init__(self):
        self.checked = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.checked:
            return
        self.checked = True
        repo = args.hub_model_id or Path(args.output_dir).absolute().name
        if args.push_to_hub and holds_sinks(model) and not is_permitted(repo):
            raise refusal(f"TrainingArguments(push_to_hub=True, hub_strategy={str(args.hub_strategy)!r}) of a model "
                          "that still has sinks (MemSinkCallback(export_dir=...) pushes its sink-free export instead)",
                          ["the model weights with their sink tensors at every push"])


class SinkLRCallback(TrainerCallback):
    """In every ``Trainer``: the model's ``MemSinkConfig.sink_lr_scale`` applied to the Trainer's
    optimizer (:func:`hf_memsinks.integrations.optimizer.attach_sink_lr`) when training starts."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and optimizer is not None:
            attach_sink_lr(model, optimizer)

