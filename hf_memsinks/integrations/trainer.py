"""A ``TrainerCallback``: sink statistics in the training logs, and the sink-free export at the end.

The plain ``Trainer`` needs nothing else: ``sequence_ids`` is a named forward argument, so the
default column filter keeps it, and the checkpoint format saves and restores sinks exactly.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from transformers import TrainerCallback

from ..checkpoints.atomic import atomic_save
from ..ids.validation import check_sequence_ids
from ..layers.projections import is_patched_projection
from .finetune import attach_sink_lr

logger = logging.getLogger(__name__)


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP / accelerate wrappers
    return model


def sink_statistics(model) -> dict[str, float]:
    """Norms of the general and sink parts of every patched projection, summed over layers.

    A sink norm that grows faster than the general one means the sinks are absorbing what the
    batches carry; a flat sink norm means no IDs reach the model.
    """
    general = sinks = 0.0
    count = 0
    with torch.no_grad():
        for module in _unwrap(model).modules():
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
    """Apply the model's ``sink_lr_scale`` to Trainer's optimizer (``MemSinkConfig.for_finetuning()``),
    log sink statistics with every Trainer log, and at the end of training save the sink-free
    model (``remove_sinks`` on a copy; the trained model keeps its sinks) to ``export_dir``.

    ``forget_ids``: export with every sink kept at its expected value except these IDs' sinks
    (see ``remove_sinks``). The tokenizer (``processing_class``) is saved alongside when given.
    The export is atomic (:func:`hf_memsinks.checkpoints.atomic.atomic_save`): files it does not write in
    ``export_dir`` are kept, and a crash leaves the previous export loadable.
    """

    def __init__(self, export_dir: str | os.PathLike | None = None, forget_ids=None, log_statistics: bool = True):
        self.export_dir = None if export_dir is None else os.fspath(export_dir)
        self.forget_ids = None if forget_ids is None else check_sequence_ids(forget_ids, "MemSinkCallback(forget_ids=)")
        self.log_statistics = log_statistics

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self.log_statistics or model is None or logs is None or "loss" not in logs:
            return
        stats = sink_statistics(model)
        if stats and state.is_world_process_zero:
            state.log_history.append({**{k: round(v, 4) for k, v in stats.items()}, "step": state.global_step})
            logger.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.export_dir is None or model is None or not state.is_world_process_zero:
            return
        self._check_export_dir()
        plain = copy.deepcopy(_unwrap(model)).remove_sinks(self.forget_ids)

        def write(directory: str) -> None:
            plain.save_pretrained(directory)
            if processing_class is not None:
                processing_class.save_pretrained(directory)

        atomic_save(self.export_dir, write)  # a crash leaves the previous export loadable
        logger.info("saved the sink-free model to %s", self.export_dir)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and optimizer is not None:
            attach_sink_lr(model, optimizer)  # MemSinkConfig.sink_lr_scale (for_finetuning's recipe)
        if self.export_dir is not None and state.is_world_process_zero:
            self._check_export_dir()  # fail before training, not after it

    def _check_export_dir(self) -> None:
        d = self.export_dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise ValueError(f"MemSinkCallback(export_dir={d!r}) exists and is not a directory")
        if os.path.isdir(d) and any("memsink" in n.lower() for n in os.listdir(d)):
            raise ValueError(
                f"MemSinkCallback(export_dir={d!r}) holds a memsink checkpoint (memsink_config.json): the "
                "sink-free export would not be clean there; choose another directory"
            )
