"""Fine-tuning a pretrained model with sinks: the two pieces of ``MemSinkConfig.for_finetuning()``
beyond adding sinks.

On a pretrained model the general neurons fit a repeated document within a few passes, before
other data can overwrite it, so sinks added beside them get little of it. A document's loss falls
on whichever path fits it fastest, while the new domain is shared by every document. So the
recipe makes each document's sinks the faster path:

* :func:`copy_init_sinks` (``sink_init="copy"``): new sinks start as copies of pretrained neurons'
  input weights (output weights zero, so outputs do not change), features that already fit text;
* :func:`attach_sink_lr` (``sink_lr_scale``): an optimizer hook makes the sinks' step a multiple
  of the optimizer's; every other parameter takes the optimizer's own step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.neurons import copy_into_spans, pick
from ..layers.projections import is_patched_projection


@torch.no_grad()
def copy_init_sinks(sites, seed: int = 0) -> None:
    """Set every sink's input weights (and bias) to those of a general neuron of its MLP: a random
    permutation of them, cycled when there are more sinks, the same for every input projection of
    one MLP (gate and up). ``sites``: the patched MLPs (``PatchedMLP``)."""
    generator = torch.Generator().manual_seed(seed)
    for site in sites:
        order = torch.randperm(site.general, generator=generator)
        source = order.repeat(-(-site.sinks // site.general))[: site.sinks]
        for module in site.in_proj:
            m = module.memsink
            for name, dim in module.neuron_dims().items():
                param = getattr(module, name)
                chunks = pick(param, dim, m.general_spans).chunk(m.neuron_chunks, dim)
                copies = torch.cat([c.index_select(dim, source.to(c.device)) for c in chunks], dim)
                copy_into_spans(param, dim, m.sink_spans, copies)


class SinkLR:
    """Multiply the optimizer's step of every sink neuron by ``scale``: the patched projections'
    weights' sink part is saved before each step (only it: the general part is left to the
    optimizer) and moved to ``old + scale * (new - old)`` after it. Any optimizer (its weight
    decay is scaled with it); every process does the same."""

    def __init__(self, model: nn.Module, scale: float):
        self.scale = float(scale)
        # every sink span of every trainable patched weight (viewed anew at each step: a wrapper such
        # as FSDP may swap a parameter's storage)
        self.targets = [(getattr(m, name), dim, start, n) for m in model.modules() if is_patched_projection(m)
                        for name, dim in m.neuron_dims().items() if getattr(m, name).requires_grad
                        for start, n in m.memsink.sink_spans]
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
    """Apply the model's ``sink_lr_scale`` to ``optimizer`` (the innermost optimizer of an
    accelerate / Trainer wrapper), once. None when the scale is 1 or the model has no sinks."""
    inner = _unwrap(model)
    patch = getattr(inner, "memsink", None)
    if patch is None or patch.config.sink_lr_scale == 1.0:
        return None
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if getattr(optimizer, "_memsink_sink_lr", None) is not None:
        return optimizer._memsink_sink_lr
    hook = SinkLR(inner, patch.config.sink_lr_scale)
    optimizer.register_step_pre_hook(hook.before)
    optimizer.register_step_post_hook(hook.after)
    optimizer._memsink_sink_lr = hook
    patch.sink_lr_attached = True
    return hook


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module  # DDP / accelerate
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # PEFT
        else:
            return model
