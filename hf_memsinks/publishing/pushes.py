"""The push paths' own checks: each refuses a push that would carry sinks before anything is created
or written, where the upload gate (:mod:`.upload_gate`) would refuse it only at the first upload.

* the patched model's ``push_to_hub`` and ``save_pretrained(push_to_hub=True)``: :func:`check_model_push`;
* every ``Trainer`` with ``push_to_hub=True``: :class:`PushGuard` (in Transformers' default callbacks,
  added by :mod:`hf_memsinks.global_patches`) stops the run before its first step;
* ``MemSinkCallback``: :class:`PushTakeover` turns the Trainer's pushes into one push of the audited
  sink-free export at the end, or opens the opt-in for a private repository while training;
* ``MemSinkSFTTrainer``: :func:`refuse_trainer_push` when the trainer is built.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from .upload_gate import SinkUploadError, check_consent, holds_sinks, is_permitted, permit, refusal, revoke

logger = logging.getLogger(__name__)

EVERY_PUSH = ["the model weights with their sink tensors at every push"]


def hub_repo(args) -> str:
    """The Hub repository a ``Trainer`` pushes to: ``hub_model_id``, else its output directory's name."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


# ---- the patched model's own pushes -----------------------------------------------------------------


def check_model_push(consent: str | None, what: str, kwargs: dict) -> None:
    """Before anything is created or written: refuse without consent, and a public repo with it."""
    if consent is None:
        raise refusal(f"{what} of a model that still has sinks", ["every sink tensor and memsink_config.json"])
    check_consent(consent, what)
    if kwargs.get("private") is False:
        raise ValueError(f"{what}: allow_sinks_upload uploads to private repositories only; drop private=False")


# ---- a Trainer's pushes (TrainingArguments(push_to_hub=True)) ----------------------------------------


def refuse_trainer_push(args, model, what: str) -> None:
    """Refuse ``push_to_hub=True`` of a model that still has sinks: it would upload them at every push."""
    if args.push_to_hub and holds_sinks(model):
        raise refusal(f"{what} of a model that still has sinks", EVERY_PUSH)


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
        if args.push_to_hub and holds_sinks(model) and not is_permitted(hub_repo(args)):
            raise refusal(f"TrainingArguments(push_to_hub=True, hub_strategy={str(args.hub_strategy)!r}) of a model "
                          "that still has sinks (MemSinkCallback(export_dir=...) pushes its sink-free export instead)",
                          EVERY_PUSH)


class PushTakeover:
    """``MemSinkCallback``'s part in the Trainer's pushes. With ``push_to_hub=True`` the Trainer's
    own pushes (every ``hub_strategy``) would upload the sinks, so when training starts they are
    switched off and only the audited export in ``export_dir`` is pushed, once, at the end, to the
    Trainer's Hub repository; without ``export_dir`` that is refused. ``consent``
    (:data:`~hf_memsinks.SINKS_UPLOAD_CONSENT`, with ``hub_private_repo=True``) keeps the Trainer's
    pushes, sinks included, to that private repository while training: to resume elsewhere."""

    def __init__(self, export_dir: str | None, consent: str | None, where: str):
        if consent is not None:
            check_consent(consent, where)
        self.export_dir = export_dir
        self.consent = consent
        self.push_export = False  # whether the export replaces the Trainer's pushes
        self.permitted = None  # the repository the consent opened while training

    def begin(self, args, model) -> None:
        """When training starts: take the pushes of a model with sinks over, or open the opt-in."""
        if not (args.push_to_hub and holds_sinks(model)):
            return
        repo = hub_repo(args)
        if self.consent is not None:
            if not args.hub_private_repo:
                raise SinkUploadError("MemSinkCallback(allow_sinks_upload=...) uploads the sinks to private "
                                      "repositories only: set TrainingArguments(hub_private_repo=True)")
            if self.permitted is None:
                permit(repo)
                self.permitted = repo
            return
        if self.export_dir is None:
            raise refusal(f"TrainingArguments(push_to_hub=True, hub_strategy={str(args.hub_strategy)!r}) of a "
                          "model that still has sinks", EVERY_PUSH)
        args.push_to_hub = False  # the Trainer's pushes carry the sinks: the export is pushed instead
        self.push_export = True
        logger.warning("MemSinkCallback: the Trainer's pushes to %s are off; the audited sink-free export in %s "
                       "will be pushed there at the end of training", repo, self.export_dir)

    def check_push(self, args, model) -> None:
        """A ``Trainer.push_to_hub()`` call of a model with sinks, to a repository not opted in: refused."""
        repo = hub_repo(args)
        if holds_sinks(model) and not is_permitted(repo):
            raise refusal(f"Trainer.push_to_hub() to {repo} of a model that still has sinks"
                          + (" (MemSinkCallback pushes the sink-free export at the end of training)"
                             if self.push_export else ""), ["the model weights with their sink tensors"])

    def push(self, args) -> None:
        """At the end of training, after the export: push it, if the Trainer's pushes were taken over."""
        if not self.push_export:
            return
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(hub_repo(args), private=args.hub_private_repo, token=args.hub_token,
                                  exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=self.export_dir, token=args.hub_token,
                          revision=args.hub_revision, commit_message="Sink-free export (hf_memsinks)")
        logger.info("pushed the sink-free export in %s to %s", self.export_dir, repo_id)

    def end(self) -> None:
        """When training ends: close the opt-in opened by :meth:`begin`."""
        if self.permitted is not None:
            revoke(self.permitted)
            self.permitted = None
