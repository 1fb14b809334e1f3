"""PEFT's adapter files keep the sinks: a checkpoint of a LoRA run resumes with the sinks it trained.

PEFT saves an adapter (``save_pretrained``, every ``Trainer`` checkpoint of a ``PeftModel``) as the
state-dict entries its tuner owns, the LoRA matrices. The sinks that :func:`hf_memsinks.train_sinks`
trains beside them live in the base model's patched projections, so without this they are missing
from the file and ``resume_from_checkpoint`` or ``PeftModel.from_pretrained`` starts them over.

:func:`with_sinks` wraps PEFT's ``get_peft_model_state_dict`` so that the adapter state also holds
the ``sink_*`` tensors of every module whose sinks train beside the adapter (in the checkpoint
format of :mod:`hf_memsinks.checkpoints.sink_tensors`). Loading needs nothing more: PEFT loads an
adapter with the model's ``load_state_dict``, whose hooks on the patched modules put the sinks back
into their own parameters.
Into a model without sinks PEFT leaves them out, and :func:`warning_without_sinks` says so. An
adapter folder with sinks in it is what a memsink checkpoint is, memorized data: the upload gate
refuses it (:mod:`hf_memsinks.publishing.upload_gate`). :mod:`hf_memsinks.global_patches` installs
both wrappers.
"""

from __future__ import annotations

import functools
import sys
import warnings

from ..checkpoints.format import SINK_KEY_MARKERS
from ..checkpoints.sink_tensors import SINK
from ..layers import sink_parts
from ..layers.adapters import adopt_wrappers
from ..layers.projections import is_patched_projection
from ..publishing.hub_internals import uploads_gated

NAME = "get_peft_model_state_dict"
LOAD_NAME = "set_peft_model_state_dict"


def trains_sinks_beside_an_adapter(module) -> bool:
    """Whether this patched module's sinks train beside an adapter: its sinks stored apart and
    trainable (:func:`hf_memsinks.train_sinks`), or a norm's weight with the general part's gradient
    zeroed."""
    if not is_patched_projection(module):
        return False
    apart = any(p.requires_grad for p in sink_parts.parts(module).values())
    return apart or any(getattr(p, "_memsink_sink_hook", False) for p in module.parameters(recurse=False))


def sink_state(model, state_dict: dict | None = None) -> dict:
    """The sink tensors that train beside the adapter, under their state-dict names: from
    ``state_dict`` where it holds them (one gathered by FSDP or DeepSpeed), else from each such
    module in turn, so no second copy of the whole model is made. Sinks that stay frozen under the
    adapter are left out, as PEFT leaves out the frozen base."""
    sinks = {}
    for name, module in model.named_modules():
        if not trains_sinks_beside_an_adapter(module):
            continue
        keys = [f"{name}.{SINK}{n}" for n in module.neuron_dims()]
        if state_dict is not None and all(k in state_dict for k in keys):
            sinks.update({k: state_dict[k] for k in keys})
        else:
            own = module.state_dict(prefix=f"{name}.")
            sinks.update({k: own[k] for k in keys})
    return sinks


def with_sinks(get_state):
    """PEFT's ``get_peft_model_state_dict`` that adds a patched model's sinks to the adapter state."""
    if getattr(get_state, "_memsink_original", None) is not None:
        return get_state

    @functools.wraps(get_state)
    def get_peft_model_state_dict(model, state_dict=None, *args, **kwargs):
        adapter = get_state(model, state_dict, *args, **kwargs)
        adapter.update(sink_state(model, state_dict))
        return adapter

    get_peft_model_state_dict._memsink_original = get_state
    return get_peft_model_state_dict


def warning_without_sinks(set_state):
    """PEFT's ``set_peft_model_state_dict`` that warns when an adapter holding sinks is loaded into a
    model without any: PEFT leaves their tensors out, and a run resumed so would train on without
    them. Into a model with sinks it adopts the adapter's wrappers at once, so that a merge before any
    forward sees the weights whole (:func:`hf_memsinks.layers.adapters.adopt_wrappers`)."""
    if getattr(set_state, "_memsink_original", None) is not None:
        return set_state

    @functools.wraps(set_state)
    def set_peft_model_state_dict(model, peft_model_state_dict, *args, **kwargs):
        sinks = [k for k in peft_model_state_dict if k.endswith(SINK_KEY_MARKERS)]
        patched = any(is_patched_projection(m) for m in model.modules())
        if patched:  # (so that a merge before any forward sees the weights whole: layers/adapters.py)
            adopt_wrappers(model)
        if sinks and not patched:
            warnings.warn(f"this adapter holds {len(sinks)} sink tensors of a MemSinks model ({sinks[0]}, ...), and "
                          "the model it is loaded into has no sinks: they are left out, as remove_sinks() would. To "
                          "resume training with them, load it onto hf_memsinks.get_memsink_model(base, config) (or "
                          "AutoMemSinkModelForCausalLM) with the config it was trained with", stacklevel=3)
        return set_state(model, peft_model_state_dict, *args, **kwargs)

    set_peft_model_state_dict._memsink_original = set_state
    return set_peft_model_state_dict


def _peft_modules():
    return [m for n, m in list(sys.modules.items()) if m is not None and (n == "peft" or n.startswith("peft."))]


def hold_sinks_in_adapters() -> None:
    """Replace ``get_peft_model_state_dict`` (:func:`with_sinks`) and ``set_peft_model_state_dict``
    (:func:`warning_without_sinks`) wherever PEFT's modules hold them (``peft``, ``peft.utils``,
    ``peft.peft_model``, ...); imports peft. Again: no effect."""
    import peft.utils.save_and_load as save_and_load

    for name, wrap in ((NAME, with_sinks), (LOAD_NAME, warning_without_sinks)):
        original = getattr(save_and_load, name)
        original = getattr(original, "_memsink_original", original)
        wrapped = wrap(original)
        for module in _peft_modules():
            if getattr(module, name, None) is original:
                setattr(module, name, wrapped)


def hold_sinks_with_the_gate() -> None:
    """:func:`hold_sinks_in_adapters` where the global patches are on (the upload gate installed);
    not after ``global_patches.uninstall()`` nor with ``HF_MEMSINKS_GLOBAL_PATCHES=0``, where it
    warns that adapter files will lack the sinks."""
    if uploads_gated():
        hold_sinks_in_adapters()
    elif not adapters_hold_sinks():
        warnings.warn("hf_memsinks' global patches are off, so PEFT's adapter files (save_pretrained, every "
                      "Trainer checkpoint) will hold the LoRA matrices without the sinks trained beside them: a run "
                      "resumed from one starts its sinks over. "
                      "hf_memsinks.integrations.adapter_files.hold_sinks_in_adapters() keeps them in alone",
                      stacklevel=3)


def release_adapters() -> None:
    """Put PEFT's own functions back (when peft was imported)."""
    for module in _peft_modules():
        for name in (NAME, LOAD_NAME):
            current = getattr(module, name, None)
            if getattr(current, "_memsink_original", None) is not None:
                setattr(module, name, current._memsink_original)


def adapters_hold_sinks() -> bool:
    """Whether PEFT's adapter state includes the sinks now (False when peft is not imported)."""
    module = sys.modules.get("peft.utils.save_and_load")
    return module is not None and getattr(getattr(module, NAME), "_memsink_original", None) is not None
