"""Training pressure on the general neurons only, for the benchmark's what-was-tried table
(docs/isolation.md): ``train.general_dropout`` and ``train.general_weight_decay``.

Both aim at what a general neuron keeps of one document. Dropout makes a general neuron an
unreliable place to store a document (it is off at random repetitions; a document's own sinks
are on at every one); extra weight decay makes the general neurons forget faster between
repetitions. Neither is a library option: measured, neither beat the sinks' learning rate.
"""

from __future__ import annotations

import torch

from hf_memsinks.layers.neurons import copy_into_spans, pick
from hf_memsinks.layers.projections import is_patched_projection


def _projections(model, role: str):
    return [m for m in model.modules() if is_patched_projection(m) and m.memsink.role == role]


def add_general_dropout(model, rate: float, seed: int) -> None:
    """In training, every general neuron is zeroed with probability ``rate`` (and the rest scaled
    by ``1 / (1 - rate)``) at each token, at the input of each patched output projection; sinks
    are untouched. Draws come from a generator of its own (``seed``)."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module, args):
        if not module.training:
            return None
        h, spans = args[0], module.memsink.general_spans
        keep = torch.ones_like(h)
        for start, n in spans:
            draw = torch.rand(*h.shape[:-1], n, generator=generator)
            keep[..., start:start + n] = (draw >= rate).to(h.dtype).to(h.device) / (1 - rate)
        return (h * keep, *args[1:])

    for module in _projections(model, "out"):
        module.register_forward_pre_hook(hook)


def add_general_weight_decay(model, optimizer: torch.optim.Optimizer, decay: float) -> None:
    """After each optimizer step, every general neuron's weights (input and output projections,
    biases of input projections) shrink by ``lr * decay``, on top of the optimizer's own decay."""
    targets = [(getattr(m, name), dim, m.memsink.general_spans) for m in model.modules() if is_patched_projection(m)
               for name, dim in m.neuron_dims().items()]

    @torch.no_grad()
    def after(opt, *_):
        shrink = 1 - opt.param_groups[0]["lr"] * decay
        for param, dim, spans in targets:
            copy_into_spans(param, dim, spans, pick(param, dim, spans) * shrink)

    optimizer.register_step_post_hook(after)
