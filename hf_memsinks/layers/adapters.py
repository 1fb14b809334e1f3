"""PEFT adapters (LoRA) around patched projections: sinks stay exact under an adapter wrapper.

**The one hook.** Every forward of the patched model first calls :func:`sync_adapters`. It looks
at what each patched projection's parent holds now: where PEFT put a wrapper around the projection,
the projection's state records it (``adapter``; every projection of the MLP lists its MLP's
adapters), the wrapper's class becomes a subclass of its own that adds :class:`AdapterWrapper`'s
forward, and an output projection's wrapper gets a pre-hook that hands both of its paths (the base
layer and ``lora_B(lora_A(x))``, computed from the *unmasked* input otherwise) the input with the
sinks applied. A wrapped projection computes like the plain module (every neuron in, no masking of
its own out), so nothing is applied twice. Where every adapter of the MLP is plain LoRA and the
call computes only the active sinks, the wrapper's forward computes those instead
(:mod:`.active_sinks_lora`), and the pre-hook leaves its gathered input alone. After
``merge_and_unload()`` the next forward sees the projection back in place. PEFT merges an adapter
into its base's whole weight: where :func:`hf_memsinks.train_sinks` stored the sinks apart, the
wrapper's ``merge`` and ``unmerge`` see the weight whole for their duration, then the sinks go back
apart into the same parameters (an optimizer holding them keeps stepping them), the adapter's share
of the sink neurons now in them. Nothing imports
``peft``: a wrapper is recognised by ``get_base_layer`` / ``base_layer``. Training sinks under LoRA
is :mod:`hf_memsinks.integrations.peft`.
"""

from __future__ import annotations

import torch
from torch import nn

from .active_sinks_lora import active_sinks_of, lora_gathered
from .lora_parts import base_of
from .projections import is_patched_projection
from .sink_parts import join, set_apart
from .state import ActiveSinks

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
        wrapper = None if current is proj else current
        if wrapper is proj.memsink.adapter:
            continue
        changed = True
        if wrapper is not None:
            if base_of(wrapper) is not proj:
                raise RuntimeError(
                    f"the sink-patched projection {attr!r} of {type(parent).__name__} was replaced by a "
                    f"{type(wrapper).__name__} that does not wrap it; patch again or remove_sinks() first"
                )
            _adopt(wrapper, proj.memsink.role)
        proj.memsink.adapter = wrapper
    if changed:  # an adapter's output has every neuron: its MLP's other input projections must match it
        adapters: dict[int, tuple] = {}
        for parent, _, proj in slots:
            if proj.memsink.wrapped:
                adapters[id(parent)] = adapters.get(id(parent), ()) + (proj.memsink.adapter,)
        wide = {id(parent) for parent, _, proj in slots if proj.memsink.role == "in" and proj.memsink.wrapped}
        for parent, _, proj in slots:
            proj.memsink.inputs_wrapped = id(parent) in wide
            proj.memsink.mlp_adapters = adapters.get(id(parent), ())


def check_unwrapped(slots: list[Slot]) -> None:
    """Removal folds the projections' own weights: an adapter still around them must be merged first."""
    if any(parent._modules.get(attr) is not proj for parent, attr, proj in slots):
        raise RuntimeError(
            "an adapter still wraps this model's MLP projections: call merge_and_unload() (PEFT) before remove_sinks()"
        )


class AdapterWrapper:
    """Mixed in ahead of an adapter wrapper's class around a patched projection: on the gathered
    path (plain LoRA, :mod:`.active_sinks_lora`) its forward computes only the active sinks; else
    the wrapper's own forward runs."""

    def forward(self, x, *args, **kwargs):
        active = _gathering(self, x, args, kwargs)
        return super().forward(x, *args, **kwargs) if active is None else lora_gathered(self, x, active)

    def merge(self, *args, **kwargs):
        return _on_whole_weight(self, super().merge, args, kwargs)

    def unmerge(self, *args, **kwargs):
        return _on_whole_weight(self, super().unmerge, args, kwargs)

    def __reduce_ex__(self, protocol):
        """Pickle by the wrapper's own class (this subclass is made when the wrapper is first seen)."""
        return _new_wrapper, (type(self).__bases__[1],), self.__dict__


_SUBCLASSES: dict[type, type] = {}


def _adopt(wrapper: nn.Module, role: str) -> None:
    """Give a wrapper first seen around a patched projection the gathered forward (its class keeps
    its name, so its repr does not change) and, around an output projection, the sinks' pre-hook."""
    if isinstance(wrapper, AdapterWrapper):
        return
    wrapper.__class__ = _subclass(type(wrapper))
    if role == "out":
        wrapper.register_forward_pre_hook(_sinks_applied_input, with_kwargs=True)


def _on_whole_weight(wrapper: nn.Module, method, args: tuple, kwargs: dict):
    """``method`` (the wrapper's merge or unmerge, which add to the base's whole weight) with the
    base's sinks joined into its weight while it runs, then set apart again in the same parameters."""
    proj = base_of(wrapper)
    if not (is_patched_projection(proj) and proj.memsink.apart):
        return method(*args, **kwargs)
    general = {name: getattr(proj, name).requires_grad for name in proj.neuron_dims()}
    kept = join(proj)
    sinks = {name: part.requires_grad for name, part in kept.items()}
    try:
        return method(*args, **kwargs)
    finally:
        set_apart(proj, kept)
        for name in general:  # (which parts train, as before)
            getattr(proj, name).requires_grad_(general[name])
            kept[name].requires_grad_(sinks[name])


def adopt_wrappers(model: nn.Module) -> None:
    """Adopt every adapter wrapper around a patched projection of ``model`` now (as the next forward
    would), so that a merge before any forward still finds the sinks' ``merge``."""
    for module in model.modules():
        proj = base_of(module)
        if proj is not None and proj is not module and is_patched_projection(proj) and hasattr(module, "merge"):
            _adopt(module, proj.memsink.role)


def _subclass(base: type) -> type:
    if base not in _SUBCLASSES:
        cls = type(base.__name__, (AdapterWrapper, base), {"__qualname__": base.__qualname__})
        cls.__module__ = __name__
        _SUBCLASSES[base] = cls
    return _SUBCLASSES[base]


def _new_wrapper(base: type) -> nn.Module:
    """Unpickling: an empty instance of the adopted class of ``base`` (state is set next)."""
    cls = _subclass(base)
    return cls.__new__(cls)


def _projection(wrapper: nn.Module) -> nn.Module | None:
    """The patched projection ``wrapper`` wraps, while the model records it as that projection's
    adapter (a wrapper taken out, or around an unpatched module, is left to its own forward)."""
    proj = base_of(wrapper)
    patch = getattr(proj, "memsink", None)
    return proj if patch is not None and patch.adapter is wrapper else None


def _gathering(wrapper: nn.Module, x, args: tuple, kwargs: dict) -> ActiveSinks | None:
    """The active sinks where this call of the wrapper computes only those (never with extra arguments)."""
    if args or kwargs or not isinstance(x, torch.Tensor) or _projection(wrapper) is None:
        return None
    return active_sinks_of(wrapper, x)


def _sinks_applied_input(wrapper: nn.Module, args: tuple, kwargs: dict):
    """The pre-hook of an output projection's wrapper: the sinks applied to its full-width input."""
    proj = _projection(wrapper)
    if not args or proj is None or _gathering(wrapper, args[0], args[1:], kwargs) is not None:
        return None
    return (proj.sink_input(args[0]),) + tuple(args[1:]), kwargs
