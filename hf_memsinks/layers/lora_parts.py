"""What an adapter wrapper around a patched projection adds, read from the wrapper's structure
(nothing imports ``peft``): where it is plain LoRA, ``lora_B(lora_A(dropout(x))) * scaling`` from
its one active adapter, which the gathered path (:mod:`.active_sinks_lora`) can compute on the
active sinks alone. Anything else a wrapper may do (DoRA and PEFT's other LoRA variants, several
active adapters, merged or disabled adapters, other adapter types, a quantized base, a forward
replaced on the instance) reads as None, and its MLP keeps the dense path."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from ..transformers_internals import Conv1D


class LoraParts(NamedTuple):
    lora_A: nn.Linear
    lora_B: nn.Linear
    dropout: nn.Module
    scaling: float
    cast_input: bool  # the input is cast to lora_A's dtype first (PEFT's default)


def base_of(wrapper: nn.Module) -> nn.Module | None:
    """The module an adapter wrapper wraps (PEFT's ``get_base_layer``, else its ``base_layer``)."""
    get_base = getattr(wrapper, "get_base_layer", None)
    return get_base() if get_base is not None else getattr(wrapper, "base_layer", None)


def plain_lora(wrapper: nn.Module) -> LoraParts | None:
    """The wrapper's one active LoRA adapter where that is all it adds to its base's output, else None."""
    if "forward" in vars(wrapper) or getattr(wrapper, "merged", True) or getattr(wrapper, "disable_adapters", True):
        return None  # (a forward set on the instance would bypass the gathered one)
    lora_A, lora_B = getattr(wrapper, "lora_A", None), getattr(wrapper, "lora_B", None)
    if not (isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict)):
        return None
    active = [name for name in getattr(wrapper, "active_adapters", ()) if name in lora_A]
    if len(active) != 1 or active[0] not in lora_B:
        return None
    name = active[0]
    if name in getattr(wrapper, "lora_variant", {}) or name in getattr(wrapper, "lora_magnitude_vector", {}) \
            or getattr(wrapper, "use_dora", {}).get(name):
        return None  # DoRA (a magnitude vector) or another variant changes the output
    a, b = lora_A[name], lora_B[name]
    base = base_of(wrapper)
    patch = getattr(base, "memsink", None)
    if type(a) is not nn.Linear or type(b) is not nn.Linear or patch is None \
            or patch.base_class not in (nn.Linear, Conv1D) or not base.weight.is_floating_point():
        return None
    return LoraParts(a, b, wrapper.lora_dropout[name], wrapper.scaling[name],
                     getattr(wrapper, "cast_input_dtype_enabled", True))
