"""PEFT adapters (LoRA) on a patched model: sinks stay exact under an adapter wrapper, and sinks
can train fully while the rest of the model trains through the adapter.

**The one hook.** Every forward of the patched model first calls :func:`sync_adapters`. It looks
at what each patched projection's parent holds now: where PEFT put a wrapper around the projection,
the projection's state gets ``wrapped = True`` and the wrapper a pre-hook that hands both of its
paths (the base layer and ``lora_B(lora_A(x))``, computed from the *unmasked* input otherwise) the
input with the sinks applied. A wrapped projection computes like the plain module (every neuron
in, no masking of its own out), so nothing is applied twice. After ``merge_and_unload()`` the
next forward sees the projection back in place. Nothing else in the package knows adapters.

**Training sinks under LoRA.** ``get_memsink_model`` -> ``peft.get_peft_model`` ->
:func:`train_sinks` -> train -> ``merge_and_unload()`` -> ``remove_sinks()``. Each patched
projection holds general and sink neurons in one weight, so "train the sinks" means: that weight
requires grad, and a gradient hook zeroes its general part (general neurons change only through LoRA).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.projections import is_patched_projection

Slot = tuple[nn.Module, str, nn.Module]  # (parent, attribute, patched projection)


def projection_slots(model: nn.Module) -> list[Slot]:
    """Where every patched projection sits, to notice when an adapter replaces it there."""
    slots = []
    for name, module in model.named_modules():
        if is_patched_projection(module):
            parent_name, _, attr = name.rpartition(".")
            slots.append((model.get_submodule(parent_name), attr, module))
    return slots


def sync_adapters(slots: list[Slot]) -> None:
    """The hook: record which patched projections an adapter wraps now (a few attribute reads per
    forward, so wrapping and ``merge_and_unload`` need no call from the user)."""
    for parent, attr, proj in slots:
        current = parent._modules.get(attr)
        wrapped = current is not proj
        if wrapped == proj.memsink.wrapped:
            continue
        if wrapped:
            get_base = getattr(current, "get_base_layer", None)
            base = get_base() if get_base is not None else getattr(current, "base_layer", None)
            if base is not proj:
                raise RuntimeError(
                    f"the sink-patched projection {attr!r} of {type(parent).__name__} was replaced by a "
                    f"{type(current).__name__} that does not wrap it; patch again or remove_sinks() first"
                )
            if proj.memsink.role == "out":
                current.register_forward_pre_hook(_sinks_applied_input(proj))
        proj.memsink.wrapped = wrapped


def check_unwrapped(slots: list[Slot]) -> None:
    """Removal folds the projections' own weights: an adapter still around them must be merged first."""
    if any(parent._modules.get(attr) is not proj for parent, attr, proj in slots):
        raise RuntimeError(
            "an adapter still wraps this model's MLP projections: call merge_and_unload() (PEFT) before remove_sinks()"
        )


def _sinks_applied_input(proj: nn.Module):
    def hook(module, args):
        if not proj.memsink.wrapped or not args:
            return None
        return (proj.sink_input(args[0]),) + tuple(args[1:])
    return hook


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
