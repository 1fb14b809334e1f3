"""PEFT adapters (LoRA) around patched projections: sinks stay exact under an adapter wrapper.

**The one hook.** Every forward of the patched model first calls :func:`sync_adapters`. It looks
at what each patched projection's parent holds now: where PEFT put a wrapper around the projection,
the projection's state gets ``wrapped = True`` and the wrapper a pre-hook that hands both of its
paths (the base layer and ``lora_B(lora_A(x))``, computed from the *unmasked* input otherwise) the
input with the sinks applied. A wrapped projection computes like the plain module (every neuron
in, no masking of its own out), so nothing is applied twice. After ``merge_and_unload()`` the
next forward sees the projection back in place. Nothing imports ``peft``: a wrapper is recognised
by ``get_base_layer`` / ``base_layer``. Training sinks under LoRA is :mod:`hf_memsinks.integrations.peft`.
"""

from __future__ import annotations

from torch import nn

from .projections import is_patched_projection

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
    changed = False
    for parent, attr, proj in slots:
        current = parent._modules.get(attr)
        wrapped = current is not proj
        if wrapped == proj.memsink.wrapped:
            continue
        changed = True
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
    if changed:  # an adapter's output has every neuron: its MLP's other input projections must match it
        wide = {id(parent) for parent, _, proj in slots if proj.memsink.role == "in" and proj.memsink.wrapped}
        adapted = {id(parent) for parent, _, proj in slots if proj.memsink.wrapped}
        for parent, _, proj in slots:
            proj.memsink.inputs_wrapped = id(parent) in wide
            proj.memsink.adapter_in_mlp = id(parent) in adapted


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
