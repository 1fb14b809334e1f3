"""PEFT adapters (LoRA) on a patched model: sinks train fully while the rest of the model trains
through the adapter. (How sinks stay exact under an adapter wrapper: :mod:`hf_memsinks.layers.adapters`.)

``get_memsink_model`` -> ``peft.get_peft_model`` -> :func:`train_sinks` -> train ->
``merge_and_unload()`` -> ``remove_sinks()``. Each patched projection holds general and sink
neurons in one weight, so "train the sinks" means: that weight requires grad, and a gradient hook
zeroes its general part (general neurons change only through LoRA).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.projections import is_patched_projection


def _general_grad_hook(general_spans: list[tuple[int, int]], dim: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        for start, n in general_spans:
            grad.narrow(dim, start, n).zero_()
        return grad

    return hook


def train_sinks(model: nn.Module) -> list[str]:
    """Make every sink neuron trainable and keep every general neuron frozen.

    Use after ``peft.get_peft_model`` (which freezes the base). The general part gets an exactly
    zero gradient, so optimizers without weight decay leave it bit-identical. AdamW's decoupled
    weight decay would still shrink it: give these parameters ``weight_decay=0`` (``Trainer`` does
    for names listed in its no-decay groups only, so pass ``TrainingArguments(weight_decay=0.0)``,
    the default).

    Args:
        model: a patched model, typically wrapped by ``peft.get_peft_model``.

    Returns:
        The names of the parameters it made trainable.
    """
    enabled = []
    for name, module in model.named_modules():
        if not is_patched_projection(module):
            continue
        for param_name, dim in module.neuron_dims().items():
            param = getattr(module, param_name)
            if getattr(param, "_memsink_sink_hook", False):
                continue
            param.requires_grad_(True)
            param.register_hook(_general_grad_hook(module.memsink.general_spans, dim))
            param._memsink_sink_hook = True
            enabled.append(f"{name}.{param_name}")
    if not enabled:
        raise ValueError("no sink-patched projection found: call get_memsink_model(...) first")
    return enabled
