"""The optimizer hooks a patched model's config needs, attached by :func:`attach_sink_lr`.

``sink_lr_scale`` (part of ``MemSinkConfig.for_finetuning()``): an optimizer hook makes the sinks'
step a multiple of the optimizer's; every other parameter takes the optimizer's own step.

On a pretrained model the general neurons fit a repeated document within a few passes, before
other data can overwrite it, so sinks added beside them get little of it; a faster step (with
``sink_init="copy"``, :mod:`hf_memsinks.layers.sink_init`) makes each document's sinks the faster path.
Every ``Trainer`` applies it (:class:`SinkLRCallback`, which :mod:`hf_memsinks.global_patches` adds to
Transformers' default callbacks); a training loop of one's own calls :func:`attach_sink_lr` once.

``general_sightings``: :class:`hf_memsinks.sightings.hold.HoldGeneral` keeps the general path and
its optimizer state as they were on a step that trained only sinks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..layers.projections import trainable_neuron_tensors
from ..sightings.hold import HoldGeneral
from ..unwrap import unwrap


class SinkLR:
    """Multiply the optimizer's step of every sink neuron by ``scale``: the patched projections'
    weights' sink part is saved before each step (only it: the general part is left to the
    optimizer) and moved to ``old + scale * (new - old)`` after it. Any optimizer (its weight
    decay is scaled with it); every process does the same."""

    def __init__(self, model: nn.Module, scale: float):
        self.scale = float(scale)
        # every sink span of every trainable patched weight (viewed anew at each step: a wrapper such
        # as FSDP may swap a parameter's storage)
        self.targets = [(param, dim, start, n) for param, dim, spans in trainable_neuron_tensors(model, "sink")
                        for start, n in spans]
        self._saved: list[torch.Tensor] = []

    def _views(self) -> list[torch.Tensor]:
        return [param.narrow(dim, start, n) for param, dim, start, n in self.targets]

    @torch.no_grad()
    def before(self, *_) -> None:
        self._saved = [v.clone() for v in self._views()]

    @torch.no_grad()
    def after(self, *_) -> None:
        for view, old in zip(self._views(), self._saved):
            torch.lerp(old, view, self.scale, out=view)  # old + scale * (new - old), written over new
        self._saved = []


def attach_sink_lr(model: nn.Module, optimizer: torch.optim.Optimizer) -> SinkLR | None:
    """Attach the optimizer hooks the model's config needs to ``optimizer`` (the innermost
    optimizer of an accelerate / Trainer wrapper), once: the sinks' ``sink_lr_scale``
    (:class:`SinkLR`, returned; None when the scale is 1 or the model has no sinks) and, under
    ``general_sightings``, :class:`HoldGeneral`."""
    inner = unwrap(model)
    patch = getattr(inner, "memsink", None)
    if patch is None:
        return None
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if patch.config.general_sightings is not None and getattr(optimizer, "_memsink_hold_general", None) is None:
        hold = HoldGeneral(inner, optimizer)
        optimizer.register_step_pre_hook(hold.before)
        optimizer.register_step_post_hook(hold.after)
        optimizer._memsink_hold_general = hold
        patch.general_held = True
    if patch.config.sink_lr_scale == 1.0:
        return None
    if getattr(optimizer, "_memsink_sink_lr", None) is not None:
        return optimizer._memsink_sink_lr
    hook = SinkLR(inner, patch.config.sink_lr_scale)
    optimizer.register_step_pre_hook(hook.before)
    optimizer.register_step_post_hook(hook.after)
    optimizer._memsink_sink_lr = hook
    patch.sink_lr_attached = True
    return hook


class SinkLRCallback(TrainerCallback):
    """In every ``Trainer``: the model's ``MemSinkConfig.sink_lr_scale`` applied to the Trainer's
    optimizer (:func:`attach_sink_lr`) when training starts."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and optimizer is not None:
            attach_sink_lr(model, optimizer)
