"""PEFT adapters (LoRA) on a patched model: sinks train fully while the rest of the model trains
through the adapter. (How sinks stay exact under an adapter wrapper: :mod:`hf_memsinks.layers.adapters`.)

``get_memsink_model`` -> ``peft.get_peft_model`` -> :func:`train_sinks` -> train ->
``merge_and_unload()`` -> ``remove_sinks()``. The patched projections' weights stay frozen; each
keeps its general neurons and its sinks move into a trainable parameter of their own
(:mod:`hf_memsinks.layers.sink_parts`), so the sinks cost a gradient and optimizer state of their
own size, never the MLP's, and no frozen copy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.adapters import adopt_wrappers
from ..layers.projections import is_patched_projection
from ..layers.sink_parts import set_apart
from .adapter_files import hold_sinks_with_the_gate


def _general_grad_hook(general_spans: list[tuple[int, int]], dim: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        for start, n in general_spans:
            grad.narrow(dim, start, n).zero_()
        return grad

    return hook


def train_sinks(model: nn.Module) -> list[str]:
    """Make every sink neuron trainable and keep every general neuron frozen.

    Use after ``peft.get_peft_model`` (which freezes the base). Each patched input and output
    projection's sinks move out of its frozen weight into ``sink_part_weight`` (and
    ``sink_part_bias``), trainable parameters of their own, so the gradient and the optimizer's
    state are the sinks' size, the general neurons cannot move (weight decay included), and no
    frozen copy of the sinks stays behind. A norm over the hidden neurons (BitNet's) is small: its
    weight becomes trainable with the general part's gradient zeroed. Checkpoints,
    ``merge_and_unload()`` (which sees the weight whole while it merges) and ``remove_sinks()`` see
    the sinks as they train, and so do PEFT's adapter files from here on (``save_pretrained``,
    ``Trainer`` checkpoints: :mod:`hf_memsinks.integrations.adapter_files`), so a resumed run keeps
    its sinks. DoRA on a patched projection is refused: it reads its base's weight whole.

    Args:
        model: a patched model, typically wrapped by ``peft.get_peft_model``.

    Returns:
        The names of the parameters it made trainable.
    """
    dora = [name for name, module in model.named_modules() if any(getattr(module, "use_dora", {}).values())
            and is_patched_projection(getattr(module, "base_layer", None))]
    if dora:
        raise ValueError(
            f"train_sinks: DoRA wraps the sink-patched projection {dora[0]} (and {len(dora) - 1} more). DoRA reads "
            "its base's weight whole in every forward, and train_sinks stores each projection's sinks apart from "
            "its frozen weight. Put plain LoRA on the MLP projections (DoRA elsewhere is fine), or fine-tune fully")
    enabled, patched = [], False
    for name, module in model.named_modules():
        if not is_patched_projection(module):
            continue
        patched = True
        if module.memsink.role != "norm":
            enabled += [f"{name}.{n}" for n in set_apart(module)]
            continue
        for param_name, dim in module.neuron_dims().items():
            param = getattr(module, param_name)
            if getattr(param, "_memsink_sink_hook", False):
                continue
            param.requires_grad_(True)
            param.register_hook(_general_grad_hook(module.memsink.general_spans, dim))
            param._memsink_sink_hook = True
            enabled.append(f"{name}.{param_name}")
    if not patched:
        raise ValueError("no sink-patched projection found: call get_memsink_model(...) first")
    adopt_wrappers(model)
    hold_sinks_with_the_gate()
    return enabled
