"""Steps that train only sinks leave the general path exactly as it was.

Under ``general_sightings`` a step in which nothing trained the general path (every sighting was a
repeat, on every process) gives it a zero gradient, but an optimizer would still move it: momentum,
weight decay, and Adam's second moment decaying between two real general steps (which then come out
too large). Over several epochs, where nearly every step after the first epoch is such a step, that
wrecked the model. :class:`HoldGeneral`, an optimizer hook that :func:`hf_memsinks.attach_sink_lr`
attaches (every ``Trainer`` does), keeps the general parameters and their optimizer state as they
were on such steps; forwards report whether they trained the general path
(``model.memsink.general_trained``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..layers.projections import trainable_neuron_tensors


class HoldGeneral:
    """On an optimizer step that trained no general path (``model.memsink.general_trained`` False
    on every process), every general parameter and its optimizer state stay exactly as they were:
    parameters without sink neurons get no gradient (``grad = None``: an optimizer skips them, its
    step count included); the patched projections' general slices, and the same slices of every
    state tensor of their shape, are saved before the step and written back after it, with the
    tensor's step count. The sink slices take the step (their bias correction counts the general
    path's steps, a detail of sinks that are removed anyway). An optimizer state of another shape
    (a factored second moment) cannot be held and is left to the optimizer, with a warning."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.patch, self.optimizer = model.memsink, optimizer
        self.mixed = trainable_neuron_tensors(model, "general")
        # (sinks stored apart hold sinks only: they take their step)
        mixed = {id(p) for p, _, _ in self.mixed + trainable_neuron_tensors(model, "sink")}
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in mixed]
        self._saved: list | None = None
        self._warned = False
        self.held_steps = 0  # steps on which the general path was held (for tests and logs)

    def _general_trained_anywhere(self) -> bool:
        import torch.distributed as dist

        trained = self.patch.general_trained
        self.patch.general_trained = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self.mixed[0][0].device if self.mixed else torch.device("cpu")
            flag = torch.tensor([float(trained)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            trained = bool(flag.item())
        return trained

    @torch.no_grad()
    def before(self, *_) -> None:
        self._saved = None
        if self._general_trained_anywhere():
            return
        self.held_steps += 1
        for p in self.others:
            p.grad = None
        saved = []
        for param, dim, spans in self.mixed:
            state = self.optimizer.state.get(param, {})
            kept = {key: [value.narrow(dim, s, n).clone() for s, n in spans] for key, value in state.items()
                    if isinstance(value, torch.Tensor) and value.shape == param.shape}
            scalars = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()
                       if key not in kept and not (isinstance(value, torch.Tensor) and value.numel() > 1)}
            if not self._warned and len(kept) + len(scalars) < len(state):
                self._warned = True
                warnings.warn(f"general_sightings: {type(self.optimizer).__name__} keeps optimizer state of "
                              "another shape than its parameter, which cannot be held on steps that trained only "
                              "sinks; use AdamW or SGD for exact isolation", UserWarning, stacklevel=2)
            saved.append(([param.narrow(dim, s, n).clone() for s, n in spans], kept, scalars, bool(state)))
        self._saved = saved

    @torch.no_grad()
    def after(self, *_) -> None:
        if self._saved is None:
            return
        for (param, dim, spans), (values, kept, scalars, had_state) in zip(self.mixed, self._saved):
            for (s, n), old in zip(spans, values):
                param.narrow(dim, s, n).copy_(old)
            state = self.optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    for (s, n), old in zip(spans, kept.get(key, ())):
                        value.narrow(dim, s, n).copy_(old)
                    if not had_state:  # the state began on this step: its general part starts at zero
                        for s, n in spans:
                            value.narrow(dim, s, n).zero_()
                elif key in scalars:
                    old = scalars[key]
                    if isinstance(value, torch.Tensor):
                        value.copy_(old)
                    else:
                        state[key] = old
                elif not had_state and isinstance(value, torch.Tensor) and value.numel() == 1:
                    value.zero_()  # a step count that began on this step
                elif not had_state and isinstance(value, (int, float)):
                    state[key] = type(value)(0)
        self._saved = None
