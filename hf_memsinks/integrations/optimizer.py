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

``sink_optimizer="rowwise"``: :class:`hf_memsinks.integrations.rowwise_sinks.RowwiseSinks` steps the
sinks stored apart itself, so the optimizer keeps no state for them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..layers.projections import trainable_neuron_tensors
from ..sightings.hold import HoldGeneral
from ..sightings.saved_counts import keep_counts_in
from ..unwrap import unwrap
from .rowwise_sinks import RowwiseSinks


class SinkLR:
    """Multiply the optimizer's step of every sink neuron by ``scale``; every other parameter takes
    the optimizer's own step. Any optimizer (its weight decay is scaled with it); every process does
    the same.

    Under ``torch.optim.Adam`` / ``AdamW`` (Trainer's default) the step is known from the
    optimizer's state, so after it the sink part of each weight is moved from AdamW's step to
    ``scale`` times it in place (:func:`_scale_adam_step`): no copy of the sinks is made. Any other
    optimizer (a subclass included: its step may differ): the sink part is saved before each step
    and moved to ``old + scale * (new - old)`` after it, a copy of every sink while it steps."""

    def __init__(self, model: nn.Module, scale: float, skip: frozenset[int] = frozenset()):
        self.scale = float(scale)
        # every sink span of every trainable patched weight (viewed anew at each step: a wrapper such
        # as FSDP may swap a parameter's storage), but those another rule steps (``skip``: their ids)
        self.targets = [(param, dim, start, n) for param, dim, spans in trainable_neuron_tensors(model, "sink")
                        if id(param) not in skip for start, n in spans]
        self._pending: list[tuple] = []

    @torch.no_grad()
    def before(self, optimizer: torch.optim.Optimizer | None = None, *_) -> None:
        groups = _adam_groups(optimizer)
        self._pending = []
        for target in self.targets:
            param, dim, start, n = target
            group = groups.get(id(param))
            if group is None:
                self._pending.append((target, None, param.narrow(dim, start, n).clone()))
            elif param.grad is not None:  # (without one Adam leaves it as it is)
                # the step count Adam's bias correction will use (read now: HoldGeneral's after-hook
                # may set the count back before this one's runs)
                count = float(optimizer.state.get(param, {}).get("step", 0)) + 1
                self._pending.append((target, (group, count), None))  # (the Adam step to follow, no copy)

    @torch.no_grad()
    def after(self, optimizer: torch.optim.Optimizer | None = None, *_) -> None:
        for (param, dim, start, n), adam, old in self._pending:
            view = param.narrow(dim, start, n)
            if old is not None:
                torch.lerp(old, view, self.scale, out=view)  # old + scale * (new - old), written over new
            else:
                group, count = adam
                decoupled = group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
                _scale_adam_step(view, optimizer.state[param], group, count, decoupled, self.scale,
                                 lambda t: t.narrow(dim, start, n))
        self._pending = []


def _adam_groups(optimizer: torch.optim.Optimizer | None) -> dict[int, dict]:
    """``{id(parameter): its param group}`` for the parameters whose Adam / AdamW step
    :func:`_scale_adam_step` can follow (plain tensors, groups neither capturable nor
    differentiable); empty for any other optimizer."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return {}
    return {id(p): g for g in optimizer.param_groups if not (g.get("capturable") or g.get("differentiable"))
            for p in g["params"] if type(p.data) is torch.Tensor and not p.is_complex()}


def _scale_adam_step(view: torch.Tensor, state: dict, group: dict, t: float, decoupled: bool, scale: float,
                     part) -> None:
    """``view`` (part of a parameter Adam just stepped) moved to where ``scale`` times that step
    takes it. Adam's step is ``lr / bc1 * m / (sqrt(v / bc2) + eps)`` (``v`` the running maximum under
    amsgrad, ``t`` the step's count), after ``p *= 1 - lr * wd`` when the decay is decoupled (AdamW);
    ``part`` cuts the view's part out of the state's tensors."""
    lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
    bc1, bc2 = 1 - float(beta1) ** t, 1 - float(beta2) ** t
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    update = part(second).sqrt().div_(bc2 ** 0.5).add_(eps)
    torch.div(part(state["exp_avg"]), update, out=update)  # m / (sqrt(v / bc2) + eps)
    step = lr / bc1
    if decoupled and wd != 0:  # new = old * (1 - lr wd) - step * update
        old = torch.add(view, update, alpha=step).div_(1 - lr * wd)
        view.copy_(old.mul_(1 - scale * lr * wd).add_(update, alpha=-scale * step))
    else:  # (Adam's decay is in the gradient, so in the update)
        view.add_(update, alpha=-(scale - 1) * step)


def attach_sink_lr(model: nn.Module, optimizer: torch.optim.Optimizer) -> SinkLR | None:
    """Attach the optimizer hooks the model's config needs to ``optimizer`` (the innermost
    optimizer of an accelerate / Trainer wrapper), once: the sinks' ``sink_lr_scale``
    (:class:`SinkLR`, returned; None when the scale is 1 or the model has no sinks), under
    ``general_sightings`` :class:`HoldGeneral`, under it or ``sinks_from_sighting`` the sightings'
    counts kept in the optimizer's state (:mod:`hf_memsinks.sightings.saved_counts`), and under
    ``sink_optimizer="rowwise"`` :class:`RowwiseSinks` (which steps the sinks stored apart at that scale
    itself; a ValueError where they are not apart)."""
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
    if (patch.config.general_sightings is not None or patch.config.sinks_from_sighting > 1) and not getattr(
            optimizer, "_memsink_counts_kept", False):
        if any(hasattr(p, "full_tensor") for p in inner.parameters()):
            raise ValueError("MemSinkConfig.general_sightings and sinks_from_sighting keep their counts in the "
                             "optimizer's state, and FSDP's sharded optimizer state dict raises on them at the first "
                             "checkpoint save: leave general_sightings None and sinks_from_sighting 1 under FSDP")
        keep_counts_in(optimizer, patch)  # (a resumed optimizer's counts go back to the model now)
        optimizer._memsink_counts_kept = patch.counts_kept = True
    rule = getattr(optimizer, "_memsink_rowwise", None)
    if patch.config.sink_optimizer == "rowwise" and rule is None:
        rule = RowwiseSinks(inner, patch.config.sink_lr_scale)
        optimizer.register_step_pre_hook(rule.before)  # (before SinkLR's, which then skips these sinks)
        optimizer._memsink_rowwise = rule
        patch.sink_rule_attached = True
    if patch.config.sink_lr_scale == 1.0:
        return None
    if getattr(optimizer, "_memsink_sink_lr", None) is not None:
        return optimizer._memsink_sink_lr
    skip = frozenset(id(part) for part, _ in rule.sinks) if rule is not None else frozenset()
    hook = SinkLR(inner, patch.config.sink_lr_scale, skip)
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
