"""``get_memsink_model``: sink neurons in every MLP of a model, in place.

Steps: find the MLPs (:func:`hf_memsinks.mlp_discovery.resolve.mlp_sites`), decide each one's split into
general and sink neurons, make the model config describe the new widths
(:func:`hf_memsinks.mlp_discovery.widths.plan_widths`), swap in the sink-aware projection classes, give
them the checkpoint format's state-dict hooks (:mod:`hf_memsinks.checkpoints.sink_tensors`) and grow the
sinks (``"add"`` mode), then swap the model's class (:mod:`hf_memsinks.model.memsink_model`). What was done is
recorded in one :class:`~hf_memsinks.model.memsink_model.ModelPatch`, which ``remove_sinks`` consumes.
"""

from __future__ import annotations

import dataclasses
import warnings

from transformers import PreTrainedModel

from ..checkpoints.layout_record import LayoutRecord
from ..checkpoints.sink_tensors import add_checkpoint_hooks
from ..config import MemSinkConfig
from ..layers.adapters import projection_slots
from ..layers.experts import aligned_split
from ..layers.mlp import PatchedMLP
from ..layers.sink_init import copy_init_sinks
from ..layers.sink_parts import set_apart
from ..layers.state import SinkState
from ..mlp_discovery.resolve import found_record, mlp_sites
from ..mlp_discovery.spec import MLPSite, select_layers
from ..mlp_discovery.widths import check_width_field, plan_widths
from ..publishing.upload_gate import register
from ..transformers_internals import loaded_from_checkpoint
from .gradient_checkpointing import wrap_checkpointing
from .memsink_model import ModelPatch, is_memsink_model, memsink_class


def get_memsink_model(model: PreTrainedModel, config: MemSinkConfig) -> PreTrainedModel:
    """Patch ``model`` in place with sink neurons and return it.

    The result is still an instance of its original class and gains ``forward(...,
    sequence_ids=...)``, ``set_sink_mode`` / ``sink_mode``, ``remove_sinks`` and a
    ``save_pretrained`` that writes a checkpoint which plain Transformers loads as the sink-free
    model. Create the optimizer after patching (``"add"`` mode replaces MLP weights).

    Args:
        model: any Transformers causal LM (a ``PreTrainedModel``), not patched yet.
        config: how many sinks, how often each is active, where the MLPs are
            (:class:`~hf_memsinks.MemSinkConfig`).

    Returns:
        ``model`` itself, patched.

    Raises:
        TypeError: ``config`` is not a ``MemSinkConfig`` or ``model`` not a ``PreTrainedModel``.
        ValueError: the model is patched already, or its MLPs do not match ``config``.
        NotImplementedError: no MLP can be found; the message says how to name them.
    """
    return patch_model(model, config, None)


def patch_model(model: PreTrainedModel, config: MemSinkConfig, record: LayoutRecord | None) -> PreTrainedModel:
    """:func:`get_memsink_model`, or with a checkpoint's ``record`` the structure it saved (restoring:
    :mod:`hf_memsinks.model.loading`): its MLPs, found as recorded, with their saved widths."""
    if not isinstance(config, MemSinkConfig):
        raise TypeError(f"config must be a MemSinkConfig, got {type(config).__name__}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"get_memsink_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    if is_memsink_model(model):
        raise ValueError("this model already has memsinks; patch a model only once")
    config = _resolve_mode(model, config, record)
    all_sites = mlp_sites(model, config.target_modules, record.found_mlps if record else None)
    sites = select_layers(all_sites, config.layers)
    layout = record.sink_layout if record else None
    if layout is not None and set(layout) != {s.name for s in sites}:
        raise ValueError(
            f"the saved sink layout names MLPs {sorted(layout)} but this model's selected MLPs are "
            f"{sorted(s.name for s in sites)}: the checkpoint does not match the base model"
        )
    if config.target_modules is not None:
        check_width_field(model, config.target_modules.get("width_attr"))
    _check_addable(model, sites, config, restoring=record is not None)
    fractions = config.layer_fractions(max(s.layer for s in all_sites) + 1)
    has_experts = any(s.kind == "experts" for s in all_sites)
    patched = [_split(site, config, layout, has_experts, fractions.get(site.layer, config.sink_fraction))
               for site in sites]
    original_widths = {s.name: s.width for s in all_sites}
    width_attrs = {s.name: s.width_attr for s in all_sites}
    external = plan_widths(model, {p.name: p.kept_width() for p in patched}, original_widths, width_attrs)
    state = SinkState(config)
    for site, mlp in zip(sites, patched):
        mlp.patch(state, external[mlp.name])
        for module in mlp.modules():
            add_checkpoint_hooks(module)
        if site.width == mlp.general:
            mlp.grow(config.init_seed, random_init=record is None)
    if config.sink_init == "copy" and config.mode == "add" and record is None:
        copy_init_sinks(patched, config.init_seed)
    if config.sink_optimizer == "rowwise":  # (the rule steps sinks that are parameters of their own)
        _sinks_apart(patched)
    patch = ModelPatch(config, state, patched, width_attrs, original_widths, found_record(all_sites), type(model))
    _swap_classes(model, patch)
    wrap_checkpointing(model, state)
    return model


def _sinks_apart(patched: list[PatchedMLP]) -> None:
    """Store every patched projection's sinks apart from its general neurons, both trainable
    (:mod:`hf_memsinks.layers.sink_parts`): before any optimizer or DDP wrapper sees the parameters
    (mixture-of-experts MLPs were refused by :func:`_check_addable`)."""
    for mlp in patched:
        for module in [*mlp.in_proj, mlp.out_proj]:
            set_apart(module, freeze_general=False)


def _resolve_mode(model: PreTrainedModel, config: MemSinkConfig, record: LayoutRecord | None) -> MemSinkConfig:
    """``mode="auto"``: split a model built from a config; refuse one that holds pretrained weights
    (loaded with ``from_pretrained``), whose neurons split mode would turn into sinks that removal
    deletes. An explicit ``mode="split"`` there only warns."""
    source = getattr(model, "name_or_path", "") or "a checkpoint"
    if record is not None or not loaded_from_checkpoint(model):
        return dataclasses.replace(config, mode="split") if config.mode == "auto" else config
    share = (f"{config.num_sink_neurons}" if config.num_sink_neurons is not None
             else "a share" if isinstance(config.layers, dict) else f"{config.sink_fraction:.0%}")
    if config.mode == "auto":
        raise ValueError(
            f"this model holds pretrained weights (loaded from {source!r}): the default split mode would turn "
            f"{share} of its pretrained MLP neurons into sinks, which remove_sinks() deletes. To fine-tune it, use "
            "get_memsink_model(model, MemSinkConfig.for_finetuning()) (sinks added beside the pretrained "
            "neurons; see docs/finetune.md), or MemSinkConfig(mode='add', ...); mode='split' carves them "
            "out anyway"
        )
    if config.mode == "split":
        warnings.warn(f"MemSinkConfig(mode='split') on a model loaded from {source!r}: {share} of its pretrained "
                      "MLP neurons become sinks, and remove_sinks() deletes them. MemSinkConfig.for_finetuning() "
                      "adds sinks beside them instead", UserWarning, stacklevel=3)
    return config


def _swap_classes(model: PreTrainedModel, record: ModelPatch) -> None:
    """The model, and its backbone when that is a separate module (callers that run the backbone
    directly, such as fused LM heads, pass IDs to it), become patched classes sharing ``record``."""
    model.memsink = record
    model.__class__ = memsink_class(type(model))
    register(model)
    record.slots = projection_slots(model)
    backbone = model.base_model
    if backbone is not model:
        record.backbone_class = type(backbone)
        backbone.memsink = record
        backbone.__class__ = memsink_class(type(backbone), backbone=True)


def _check_addable(model: PreTrainedModel, sites: list[MLPSite], config: MemSinkConfig, restoring: bool) -> None:
    """``"add"`` mode must leave the model's outputs unchanged, which a norm over the hidden
    neurons does not allow (new neurons change every neuron's scale); ``sink_optimizer="rowwise"``
    stores sinks apart from dense projections only. Checked before anything is changed."""
    if config.sink_optimizer == "rowwise" and any(site.kind == "experts" for site in sites):
        raise ValueError("MemSinkConfig(sink_optimizer='rowwise') steps sinks stored apart from dense MLP "
                         "projections; a mixture-of-experts model's sinks are rows of its expert tensors: use "
                         "sink_optimizer='adamw'")
    normed = [s for s in sites if s.norm is not None]
    if normed and not restoring and config.mode == "add":
        raise NotImplementedError(
            f"MemSinkConfig(mode='add') cannot add sinks to model type {model.config.model_type!r} with its outputs "
            f"unchanged: its MLP normalises over the hidden neurons ({normed[0].name}, a mean over the width), so "
            "new neurons change every neuron's scale. Use mode='split' (train with the sinks from the start)"
        )


def _split(site: MLPSite, config: MemSinkConfig, layout: dict | None, has_experts: bool,
           fraction: float) -> PatchedMLP:
    """The MLP's general and sink neuron counts: from the saved layout when restoring a checkpoint,
    else from the config (``fraction``: its layer's sink_fraction); its current width must be the
    general part or the whole."""
    if layout is not None:
        general, sinks = layout[site.name]["general"], layout[site.name]["sinks"]
    else:
        general, sinks = config.num_sinks_for(site.width, fraction)
        if has_experts and config.num_sink_neurons is None:  # grouped_mm needs aligned widths
            general, sinks = aligned_split(general, sinks, config.mode)
    if site.width not in (general, general + sinks):
        raise ValueError(f"{site.name} has width {site.width}; the sink layout expects {general} or {general + sinks}")
    return PatchedMLP(site.name, site.layer, site.in_proj, site.out_proj, general, sinks, site.chunks,
                      site.width_attr, site.kind, site.norm)
