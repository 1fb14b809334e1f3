"""The forward of every patched model and patched backbone, as one function: :func:`patched_forward`.

``memsink_class`` (:mod:`.memsink_model`) gives each patched class a ``forward`` with its base
class's signature plus ``sequence_ids`` that calls it; ``model.memsink`` is the ``ModelPatch``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..ids.validation import check_batch_ids
from ..layers.adapters import sync_adapters
from ..sightings.later_sinks import later_sighting_ids
from ..sightings.routing import routed_forward, routes


@torch.compiler.disable
def _start_call(patch, ids: torch.Tensor | None, training: bool):
    """The eager start of every forward (under torch.compile, the one graph break of ours): a
    warning, once, if training runs but no optimizer has the hooks the config needs; a training
    call's note that it trains the general path (a routed call's own calls say so in
    ``routed_forward``); then the call's masks (``SinkState.enter``)."""
    if training and not (patch.routing is not None and patch.routing.inside):
        patch.general_trained = True
    if training and not patch.sink_lr_warned and (
            (patch.config.sink_lr_scale != 1.0 and not patch.sink_lr_attached)
            or (patch.config.general_sightings is not None and not patch.general_held)
            or (patch.config.sink_optimizer != "adamw" and not patch.sink_rule_attached)
            or (patch.config.sinks_from_sighting > 1 and not patch.counts_kept)):
        patch.sink_lr_warned = True
        warnings.warn(
            f"MemSinkConfig(sink_lr_scale={patch.config.sink_lr_scale}, general_sightings="
            f"{patch.config.general_sightings}, sink_optimizer={patch.config.sink_optimizer!r}, sinks_from_sighting="
            f"{patch.config.sinks_from_sighting}) needs its optimizer "
            "hooks, and no optimizer has them: without them the sinks train at the general neurons' learning rate "
            "and isolate less, under general_sightings the optimizer's momentum and weight decay move the general "
            "path on steps that trained only sinks, under sink_optimizer='rowwise' the optimizer keeps its "
            "state for the sinks, and under sinks_from_sighting the sightings' counts are not saved with the "
            "optimizer's state, so a resumed run counts afresh. "
            "Every transformers Trainer (and MemSinkSFTTrainer) attaches them; in your own training loop call "
            "hf_memsinks.attach_sink_lr(model, optimizer) once", UserWarning, stacklevel=3)
    return patch.state.enter(ids, training)


def patched_forward(model: nn.Module, base: type, backbone: bool, takes_use_cache: bool, sequence_ids, args: tuple,
                    kwargs: dict):
    """The forward of every patched model (and patched backbone): ``base.forward`` as one sink call.

    1. A backbone called without IDs inside its model's call joins that call (the usual path).
    2. In eval mode ``"activate"`` with IDs set by ``set_sink_mode``, those IDs are the call's.
    3. The IDs are checked against the inputs (``check_batch_ids``); under ``general_sightings`` a
       training call with IDs is routed (:mod:`.routing`); under ``sinks_from_sighting`` a training
       call's early sightings lose their ID (:mod:`hf_memsinks.sightings.later_sinks`; a training-mode
       forward without gradients, such as a trainer's extra pass for metrics, neither counts nor
       changes them).
    4. Adapters wrapped around projections since the last call are noticed (``sync_adapters``).
    5. The call's masks are built (:func:`_start_call`), ``base.forward`` runs, the state is restored.

    After ``remove_sinks`` a forward wrapper that captured this one (accelerate's fp32 wrapper,
    TRL's fused head: set on the instance by a trainer) still calls it: it is then ``base.forward``.
    """
    patch = getattr(model, "memsink", None)  # (a ModelPatch)
    if patch is None:
        if sequence_ids is not None:
            raise TypeError(f"{type(model).__name__}'s sinks were removed: its forward takes no sequence_ids")
        return base.forward(model, *args, **kwargs)
    state = patch.state
    if backbone and sequence_ids is None and state.current() is not None:
        return base.forward(model, *args, **kwargs)
    if not model.training and state.eval_mode == "activate" and state.eval_ids is not None:
        if sequence_ids is not None:  # one place for the IDs: never silently replace the caller's
            raise ValueError(
                "sink mode 'activate' was set with its own sequence IDs, and this forward also got "
                "sequence_ids: give them in one place (set_sink_mode('activate') without IDs uses "
                "each forward's)"
            )
        sequence_ids = state.eval_ids
    inputs = kwargs.get("input_ids", args[0] if args else None)
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
    ids = check_batch_ids(sequence_ids, inputs, cached)
    if ids is not None and routes(model, backbone):
        return routed_forward(model, args, kwargs, ids)
    if ids is not None and model.training and torch.is_grad_enabled() and patch.config.sinks_from_sighting > 1:
        ids = later_sighting_ids(patch, ids, inputs, kwargs.get("attention_mask"))
    sync_adapters(patch.slots)
    if model.training and takes_use_cache and "use_cache" not in kwargs and kwargs.get("position_ids") is not None:
        # Packed rows (position_ids restarting per document) need Transformers' packed-sequence
        # attention masks, which a KV cache turns off; no cache is needed in training. Only
        # then: the packed-sequence check reads a tensor on the host (a device sync).
        kwargs["use_cache"] = False
    previous = _start_call(patch, ids, model.training)
    try:
        return base.forward(model, *args, **kwargs)
    finally:
        state.leave(previous)
