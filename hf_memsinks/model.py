"""Patched-model API: ``get_memsink_model``, forward with ``sequence_ids``, eval modes,
``remove_sinks`` (the exact inverse, like PEFT's ``merge_and_unload``), save and load.

The patched model is the user's own model object whose class is swapped for a subclass of its
class (same name), so ``isinstance``, ``Trainer``, ``generate`` and ``save_pretrained`` keep
working and ``config.architectures`` stays what it was.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .architectures import MLPSite, mlp_sites, neuron_dim, select_layers
from .config import MemSinkConfig, find_config_file
from .discovery import set_field
from .experts import aligned_split, fold_experts, grow_experts, is_patched_experts, patch_experts
from .ids import check_sequence_ids
from .layers import is_patched_projection, patch_projection, unpatch_projection
from .masks import sink_mask
from .saving import atomic_save
from .state import EVAL_MODES, PAPER_MODE_NAMES, ReplayInCall, SinkState

SINK_KEY_MARKERS = (".sink_weight", ".sink_bias",  # projections; batched experts (hf_memsinks.experts):
                    ".sink_gate_up_proj", ".sink_gate_up_proj_bias", ".sink_up_proj", ".sink_up_proj_bias", ".sink_down_proj")


@dataclass
class _PatchedSite:
    """One patched MLP: its projections and neuron counts."""

    name: str
    layer: int
    in_proj: list[nn.Module]
    out_proj: nn.Module
    general: int
    sinks: int
    chunks: int
    width_attr: str | None = None
    kind: str = "mlp"  # "experts": out_proj is a batched experts module (hf_memsinks.experts)
    norm: nn.Module | None = None  # a norm over the hidden neurons, applying the sinks at its input

    def kept_width(self, forget_ids=None) -> int:
        """Width of this MLP in the sink-free model: general only, or every neuron (sinks kept at
        their expected value, or zeroed where a norm over the neurons needs the full width)."""
        return self.general if forget_ids is None and self.norm is None else self.general + self.sinks


def is_memsink_model(model: nn.Module) -> bool:
    return isinstance(model, MemSinkModelMixin)


# ---- patching -------------------------------------------------------------------------------------


def get_memsink_model(model: PreTrainedModel, config: MemSinkConfig) -> PreTrainedModel:
    """Patch ``model`` in place with sink neurons and return it.

    The result is still an instance of its original class and gains ``forward(...,
    sequence_ids=...)``, :meth:`~MemSinkModelMixin.sink_mode`, :meth:`~MemSinkModelMixin.remove_sinks`
    and a ``save_pretrained`` that writes a checkpoint which plain Transformers loads as the
    sink-free model. Create the optimizer after patching (``"add"`` mode replaces MLP weights).
    """
    if not isinstance(config, MemSinkConfig):
        raise TypeError(f"config must be a MemSinkConfig, got {type(config).__name__}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"get_memsink_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    if is_memsink_model(model):
        raise ValueError("this model already has memsinks; patch a model only once")
    all_sites = mlp_sites(model, config.target_modules)
    sites = select_layers(all_sites, config.layers)
    layout = config.sink_layout
    if layout is not None and set(layout) != {s.name for s in sites}:
        raise ValueError(
            f"the saved sink layout names MLPs {sorted(layout)} but this model's selected MLPs are "
            f"{sorted(s.name for s in sites)}: the checkpoint does not match the base model"
        )
    if config.target_modules is not None:
        _check_width_attr(model, config.target_modules.get("width_attr"))
    original_widths = {s.name: s.width for s in all_sites}
    has_experts = any(s.kind == "experts" for s in all_sites)
    normed = [s for s in sites if s.norm is not None]
    if normed and layout is None and config.mode == "add":
        raise NotImplementedError(
            f"MemSinkConfig(mode='add') cannot add sinks to model type {model.config.model_type!r} with its outputs "
            f"unchanged: its MLP normalises over the hidden neurons ({normed[0].name}, a mean over the width), so "
            "new neurons change every neuron's scale. Use mode='split' (train with the sinks from the start)"
        )
    patched: list[_PatchedSite] = []
    for site in sites:
        if layout is not None:
            general, sinks = layout[site.name]["general"], layout[site.name]["sinks"]
        else:
            general, sinks = config.num_sinks_for(site.width)
            if has_experts and config.num_sink_neurons is None:  # grouped_mm needs aligned widths
                general, sinks = aligned_split(general, sinks, config.mode)
        if site.width == general:
            _grow_site(site, sinks, config, random_init=layout is None)
        elif site.width != general + sinks:
            raise ValueError(f"{site.name} has width {site.width}; the sink layout expects {general} or {general + sinks}")
        patched.append(_PatchedSite(site.name, site.layer, site.in_proj, site.out_proj, general, sinks, site.chunks,
                                    site.width_attr, site.kind, site.norm))

    width_attrs = {s.name: s.width_attr for s in all_sites}
    external = _plan_widths(model, {p.name: p.kept_width() for p in patched}, original_widths, width_attrs)
    state = SinkState(config)
    for p in patched:
        if p.kind == "experts":
            patch_experts(p.out_proj, general=p.general, sinks=p.sinks, layer=p.layer, state=state,
                          external_width=external[p.name])
            continue
        norm = [(p.norm, "norm")] if p.norm is not None else []
        for module, role in [(m, "in") for m in p.in_proj] + [(p.out_proj, "out")] + norm:
            patch_projection(module, role, general=p.general, sinks=p.sinks, chunks=p.chunks,
                             layer=p.layer, state=state, external_width=external[p.name],
                             behind_norm=p.norm is not None)
    model.__class__ = _memsink_class(type(model))
    model.memsink_config = config
    model._memsink_state = state
    model._memsink_sites = patched
    model._memsink_width_attr = width_attrs
    model._memsink_original_widths = original_widths
    state.slots = _projection_slots(model)
    backbone = model.base_model
    if backbone is not model:  # callers that run the backbone directly (fused LM heads) pass IDs to it
        backbone.__class__ = _memsink_class(type(backbone), backbone=True)
        backbone._memsink_state = state
    _rewrap_checkpointing(model)
    return model


def _check_width_attr(model: PreTrainedModel, width_attr: str | None) -> None:
    """A width field the model config lacks (a misspelling) would be set on the config as a new,
    ignored attribute, leaving the real width wrong in saved checkpoints."""
    if width_attr is None or hasattr(model.config, width_attr):
        return
    import difflib

    fields = [k for k in model.config.to_dict() if isinstance(getattr(model.config, k, None), (int, type(None)))]
    near = difflib.get_close_matches(width_attr, fields, n=1)
    raise ValueError(
        f"MemSinkConfig.target_modules: width_attr {width_attr!r} is not a field of {type(model.config).__name__}"
        + (f" (did you mean {near[0]!r}?)" if near else "")
        + "; name the config field holding the MLP width, or None if the model hard-codes it"
    )


def _projection_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, projection) for every patched projection, to notice adapter wrappers."""
    slots = []
    for name, module in model.named_modules():
        if is_patched_projection(module):
            parent_name, _, attr = name.rpartition(".")
            slots.append((model.get_submodule(parent_name), attr, module))
    return slots


def _sync_adapter_wrappers(slots) -> None:
    """Keep sinks exact when an adapter (PEFT LoRA) wraps a patched projection.

    A wrapper adds ``lora_B(lora_A(x))`` computed from the *unmasked* input, so for an output
    projection a pre-hook on the wrapper hands both paths the masked input; and wrapped input
    projections compute every neuron (the wrapper adds to all of them). Checked every forward
    (a few attribute reads), so wrapping and ``merge_and_unload`` need no call from the user.
    """
    for parent, attr, proj in slots:
        current = parent._modules.get(attr)
        wrapped = current is not proj
        if wrapped == proj.memsink_wrapped:
            continue
        if wrapped:
            base = current.get_base_layer() if hasattr(current, "get_base_layer") else getattr(current, "base_layer", None)
            if base is not proj:
                raise RuntimeError(
                    f"the sink-patched projection {attr!r} of {type(parent).__name__} was replaced by a "
                    f"{type(current).__name__} that does not wrap it; patch again or remove_sinks() first"
                )
            if proj.memsink_role == "out":
                current.register_forward_pre_hook(_masked_input_hook(proj))
        proj.memsink_wrapped = wrapped


def _masked_input_hook(proj: nn.Module):
    def hook(module, args):
        if not proj.memsink_wrapped or not args:
            return None
        proj._memsink_prepared = True
        return (proj.sink_input(args[0]),) + tuple(args[1:])
    return hook


def _grow_site(site: MLPSite, sinks: int, config: MemSinkConfig, random_init: bool) -> None:
    """Append ``sinks`` neurons per chunk to the MLP: input rows random (like the existing ones),
    output columns zero, so the model's outputs do not change."""
    width, chunks = site.width, site.chunks
    generator = torch.Generator().manual_seed(config.init_seed * 1_000_003 + site.layer)
    if site.kind == "experts":
        grow_experts(site.out_proj, width, sinks, generator, random_init)
        return
    for module in site.in_proj:
        dim = neuron_dim(module, "in")
        weight = module.weight.data
        std = float(weight.float().std()) if random_init and weight.numel() > 1 else 0.0
        shape = list(weight.shape)
        shape[dim] = sinks
        blocks = []
        for k in range(chunks):
            blocks.append(weight.narrow(dim, k * width, width))
            new = torch.randn(shape, generator=generator) * std if std > 0 else torch.zeros(shape)
            blocks.append(new.to(device=weight.device, dtype=weight.dtype))
        module.weight = nn.Parameter(torch.cat(blocks, dim), requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            bias = module.bias.data
            parts = []
            for k in range(chunks):
                parts += [bias[k * width : (k + 1) * width], bias.new_zeros(sinks)]
            module.bias = nn.Parameter(torch.cat(parts), requires_grad=module.bias.requires_grad)
    out = site.out_proj
    dim = neuron_dim(out, "out")
    shape = list(out.weight.shape)
    shape[dim] = sinks
    zeros = out.weight.data.new_zeros(shape)
    out.weight = nn.Parameter(torch.cat([out.weight.data, zeros], dim), requires_grad=out.weight.requires_grad)


def _plan_widths(model: PreTrainedModel, widths: dict[str, int], original_widths: dict[str, int],
                 width_attrs: dict[str, str | None]) -> dict[str, int]:
    """Make the model config describe MLPs of ``widths`` (patched MLPs; the rest keep theirs).

    Per config width field (``width_attrs``: MLP name -> field, dotted for sub-configs): set it
    when one value fits every MLP it sizes; otherwise (no field, as Bloom and MPT hard-code the
    width; or a subset of layers patched) MLPs are zero-padded to their original width in
    checkpoints. Returns the checkpoint width per patched MLP.
    """
    all_widths = {**original_widths, **widths}
    by_field: dict[str | None, list[str]] = {}
    for name in all_widths:
        by_field.setdefault(width_attrs.get(name), []).append(name)
    external: dict[str, int] = {}
    for field, names in by_field.items():
        values = {all_widths[n] for n in names}
        if field is not None and len(values) == 1:
            set_field(model.config, field, values.pop())
            external.update((n, all_widths[n]) for n in names if n in widths)
            continue
        for name in (n for n in names if n in widths):
            if widths[name] > original_widths[name]:
                raise ValueError(
                    f"the config of {type(model).__name__} cannot describe MLPs of widths {sorted(values)}"
                    + ("" if field else " (this architecture hard-codes its MLP width)")
                    + ": patch every layer, or use mode='split'"
                )
            external[name] = original_widths[name]
    return external


def _rewrap_checkpointing(model: nn.Module) -> None:
    """If activation checkpointing was enabled before patching, make its replays see the IDs."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and not hasattr(func, "_memsink_original"):
            module._gradient_checkpointing_func = ReplayInCall(func, model._memsink_state)


def _checked_ids(sequence_ids: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``sequence_ids`` validated against the batch and moved to its device (None stays None)."""
    if sequence_ids is None:
        return None
    ref = kwargs.get("input_ids", args[0] if args else None)
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    ids = check_sequence_ids(sequence_ids, "sequence_ids", check_values="host")
    if ref is not None:
        batch, length = ref.shape[0], ref.shape[1]
        if ids.dim() == 1:
            if ids.shape[0] != batch:
                raise ValueError(f"sequence_ids has {ids.shape[0]} IDs for a batch of {batch} sequences")
        elif ids.dim() == 2:
            if ids.shape[0] != batch:
                raise ValueError(f"sequence_ids has {ids.shape[0]} rows for a batch of {batch} sequences")
            if ids.shape[1] != length:
                cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
                if cached and ids.shape[1] > length:
                    ids = ids[:, -length:]  # generation step: new tokens continue the last document
                else:
                    raise ValueError(
                        f"per-token sequence_ids have length {ids.shape[1]} but the inputs have {length} tokens"
                    )
        else:
            raise ValueError(f"sequence_ids must have shape (batch,) or (batch, seq_len), got {tuple(ids.shape)}")
        ids = ids.to(ref.device, non_blocking=True)
    return ids.long()


class _PatchedClass:
    """What the patched model and its patched backbone share: activation checkpointing enabled
    after patching (replays must see their own call's IDs) and pickling."""

    def __reduce_ex__(self, protocol):
        """The class is made at patch time, so pickle cannot find it by name: rebuild it from the
        original class (importable) on load, then restore the instance state as usual."""
        return _new_patched_model, (self._memsink_base_class, not isinstance(self, MemSinkModelMixin)), self.__dict__

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        func = ReplayInCall(gradient_checkpointing_func, self._memsink_state)
        return self._memsink_base_class._set_gradient_checkpointing(
            self, enable=enable, gradient_checkpointing_func=func, **kwargs
        )


# ---- the patched model class ----------------------------------------------------------------------


class MemSinkModelMixin(_PatchedClass):
    """Methods every patched model gains. Mixed in ahead of the model's own class."""

    # -- evaluation modes --

    def set_sink_mode(self, mode: str = "drop", sequence_ids: Any = None) -> None:
        """How sinks behave in eval mode (training always follows the batch's IDs).

        ``"drop"`` (default; paper ``dropout``): sinks off, general neurons x eval scale.
        ``"expected"`` (paper ``all``): every sink at its expected value ``sink_active_prob``.
        ``"activate"`` (paper ``activate_seq``): general plus the sinks of ``sequence_ids`` (given
        here, or to each forward / generate call).
        ``"exclude"`` (paper ``exclude_seq_ids``): ``"expected"`` with the sinks of the given IDs at 0.
        """
        mode = PAPER_MODE_NAMES.get(mode, mode)
        if mode not in EVAL_MODES:
            raise ValueError(f"unknown sink mode {mode!r}; use one of {EVAL_MODES} (or the paper's {tuple(PAPER_MODE_NAMES)})")
        ids = None
        if sequence_ids is not None:
            if mode in ("drop", "expected"):
                raise ValueError(f"sink mode {mode!r} takes no sequence IDs")
            ids = check_sequence_ids(sequence_ids, "set_sink_mode(sequence_ids=)")
            if ids.dim() > 2:
                raise ValueError(f"set_sink_mode(sequence_ids=) must have shape (batch,) or (batch, seq_len), got {tuple(ids.shape)}")
        elif mode == "exclude":
            raise ValueError("sink mode 'exclude' needs the sequence IDs whose sinks to exclude")
        self._memsink_state.eval_mode = mode
        self._memsink_state.eval_ids = ids

    @contextlib.contextmanager
    def sink_mode(self, mode: str, sequence_ids: Any = None) -> Iterator["MemSinkModelMixin"]:
        """Context manager form of :meth:`set_sink_mode`; restores the previous mode on exit."""
        state = self._memsink_state
        previous = (state.eval_mode, state.eval_ids)
        self.set_sink_mode(mode, sequence_ids)
        try:
            yield self
        finally:
            state.eval_mode, state.eval_ids = previous

    # -- inspection --

    def sink_parameters(self) -> dict[str, torch.Tensor]:
        """Copies of every sink tensor, keyed like the checkpoint (``...c_fc.sink_weight``)."""
        out = {}
        for name, module in self.named_modules():
            if is_patched_projection(module) or is_patched_experts(module):
                for param, (_, sinks) in module.general_and_sink_parts().items():
                    out[f"{name}.sink_{param}"] = sinks
        return out

    # -- forgetting and removal --

    def forget_sinks(self, sequence_ids: Iterable[int] | torch.Tensor) -> float:
        """Delete, in place, the sinks that ``sequence_ids`` switch on (the model stays patched;
        serve it in ``"activate"`` mode). Returns the share of all sinks deleted; warns when that
        share is most of them. See :mod:`hf_memsinks.forgetting`."""
        from .forgetting import forget_sinks

        return forget_sinks(self, sequence_ids)

    def remove_sinks(self, forget_ids: Iterable[int] | torch.Tensor | None = None) -> PreTrainedModel:
        """Turn this model, in place, into a plain model of its original class and return it.

        Without ``forget_ids``: sinks are deleted and the eval scaling is folded into the general
        weights; logits equal this model's default eval mode (``"drop"``). With ``forget_ids``:
        every sink is kept at its expected value except the sinks of those IDs, which are zeroed
        (``"exclude"`` mode folded into plain weights). The config loses every trace of sinks.
        Copy the model first (``copy.deepcopy``) to keep the patched one.
        """
        for parent, attr, proj in self._memsink_state.slots:
            if parent._modules.get(attr) is not proj:
                raise RuntimeError(
                    "an adapter still wraps this model's MLP projections: call merge_and_unload() (PEFT) "
                    "before remove_sinks()"
                )
        config: MemSinkConfig = self.memsink_config
        ids = None
        if forget_ids is not None:
            ids = check_sequence_ids(forget_ids, "remove_sinks(forget_ids=)").reshape(-1)
            if ids.numel() == 0:
                raise ValueError("forget_ids is empty; pass None to drop every sink")
            from .forgetting import coverage_warning

            normed = [s.name for s in self._memsink_sites if s.norm is not None]
            if normed:
                raise NotImplementedError(
                    f"remove_sinks(forget_ids=...) cannot fold model type {self.config.model_type!r} into plain weights "
                    f"exactly: its MLP normalises over the hidden neurons ({normed[0]}), so sinks at their expected "
                    "value (a fraction of each, before the norm) have no plain-weight form. remove_sinks() without "
                    "forget_ids is exact; or forget_sinks(ids) and serve the patched model"
                )
            coverage_warning(self, ids, "remove_sinks(forget_ids=...)")
        sites: list[_PatchedSite] = self._memsink_sites
        widths = {s.name: s.kept_width(ids) for s in sites}
        external = _plan_widths(self, widths, self._memsink_original_widths, self._memsink_width_attr)
        with torch.no_grad():
            for site in sites:
                _fold_site(site, config, ids, external[site.name])
        backbone = self.base_model
        if backbone is not self:
            del backbone._memsink_state
            backbone.__class__ = backbone._memsink_base_class
        base = self._memsink_base_class
        for attr in ("memsink_config", "_memsink_state", "_memsink_sites", "_memsink_width_attr",
                     "_memsink_original_widths"):
            delattr(self, attr)
        self.__class__ = base
        for module in self.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if hasattr(func, "_memsink_original"):
                module._gradient_checkpointing_func = func._memsink_original
        self.remove_sinks = _already_removed
        return self

    # -- checkpoints --

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save like any Transformers model, plus ``memsink_config.json``. Plain
        ``AutoModelForCausalLM`` loads the result as the sink-free model (sink tensors unused);
        ``AutoMemSinkModelForCausalLM.from_pretrained`` restores the sinks.

        Atomic (:func:`hf_memsinks.saving.atomic_save`): everything is written into a staging
        directory next to ``save_directory`` and swapped in at once, so a crash at any point leaves
        the previous checkpoint there loadable; files of that directory which this save does not
        write are kept."""
        is_main = args[0] if args else kwargs.get("is_main_process", True)
        base_save = self._memsink_base_class.save_pretrained
        if not is_main:
            return base_save(self, save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
            kwargs["repo_id"] = os.path.basename(os.path.abspath(os.fspath(save_directory)))
        layout = {s.name: {"layer": s.layer, "general": s.general, "sinks": s.sinks} for s in self._memsink_sites}
        memsink_config = MemSinkConfig.from_dict({**self.memsink_config.to_dict(), "sink_layout": layout})
        result = []

        def write(directory: str) -> None:
            memsink_config.save_pretrained(directory)
            result.append(base_save(self, directory, *args, **kwargs))

        atomic_save(save_directory, write)
        return result[0]


def _new_patched_model(base: type, backbone: bool = False) -> PreTrainedModel:
    """Unpickling: an empty instance of the patched class of ``base`` (state is set next)."""
    cls = _memsink_class(base, backbone)
    return cls.__new__(cls)


def _already_removed(*args, **kwargs):
    raise RuntimeError("remove_sinks() was already called on this model: it is a plain model without sinks now")


def remove_sinks(model: nn.Module, forget_ids=None) -> PreTrainedModel:
    """Function form of ``model.remove_sinks()`` with a clear error for unpatched models."""
    if not is_memsink_model(model):
        raise ValueError(
            f"{type(model).__name__} has no memsinks: it was never patched with get_memsink_model, "
            "or its sinks were already removed"
        )
    return model.remove_sinks(forget_ids=forget_ids)


def _fold_site(site: _PatchedSite, config: MemSinkConfig, forget_ids: torch.Tensor | None, width: int) -> None:
    """Replace a patched MLP's weights by plain ones (general only, or general + scaled sinks),
    zero-padded to ``width``, and give its projections back their classes."""
    g, s = site.general, site.sinks
    if forget_ids is None:
        general_scale, sink_coef = config.general_eval_scale, None
    else:
        layer = site.layer if config.per_layer_masks else None
        forgotten = sink_mask(forget_ids, s, config.sink_active_prob, salt=config.salt, layer=layer,
                              scheme=config.mask_scheme).any(0)
        general_scale, sink_coef = 1.0, config.sink_active_prob * (~forgotten).float()
    if site.kind == "experts":
        fold_experts(site.out_proj, g, s, general_scale, sink_coef, width)
        return

    def pad(tensor: torch.Tensor, dim: int, chunks: int) -> torch.Tensor:
        own = tensor.shape[dim] // chunks
        if own == width:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = width - own
        blocks = []
        for k in range(chunks):
            blocks += [tensor.narrow(dim, k * own, own), tensor.new_zeros(shape)]
        return torch.cat(blocks, dim)

    for module in site.in_proj:
        for name, (general, sinks) in module.general_and_sink_parts().items():
            dim = neuron_dim(module, "in") if name == "weight" else 0
            if forget_ids is None:
                value = general
            else:  # full width again, general and sinks interleaved back per chunk
                value = torch.cat([torch.cat([a, b], dim) for a, b in
                                   zip(general.chunk(site.chunks, dim), sinks.chunk(site.chunks, dim))], dim)
            _replace(module, name, pad(value, dim, site.chunks))
        unpatch_projection(module)
    out = site.out_proj
    dim = neuron_dim(out, "out")
    general, sinks = out.general_and_sink_parts()["weight"]
    if sink_coef is None:
        value = general * general_scale if general_scale != 1.0 else general
    else:
        shape = [1, 1]
        shape[dim] = s
        value = torch.cat([general, sinks * sink_coef.to(sinks).reshape(shape)], dim)
    _replace(out, "weight", pad(value, dim, 1))
    unpatch_projection(out)
    if site.norm is not None:  # full width kept (its statistics run over it), zero where sinks were
        for name, (general, _) in site.norm.general_and_sink_parts().items():
            _replace(site.norm, name, pad(general, 0, 1))
        unpatch_projection(site.norm)


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


_MODEL_CLASSES: dict[tuple[type, bool], type] = {}


def _memsink_class(base: type, backbone: bool = False) -> type:
    """``base`` with a forward that takes ``sequence_ids`` and runs as one sink call.

    For the model: :class:`MemSinkModelMixin` in front. For its backbone (``model.base_model``):
    only the forward and checkpointing support, and a forward without IDs inside the model's own
    call (the usual path) joins that call. Every other forward starts its own call, so it sees its
    own IDs or, in training without any, raises.

    The subclass keeps ``base``'s name (so ``config.architectures`` is unchanged) and exposes
    ``base.forward``'s signature plus ``sequence_ids``, which is what ``Trainer`` reads to decide
    which dataset columns to keep and what ``generate`` reads to validate its kwargs.
    """
    if (base, backbone) in _MODEL_CLASSES:
        return _MODEL_CLASSES[base, backbone]

    takes_use_cache = "use_cache" in inspect.signature(base.forward).parameters

    def forward(self, *args, sequence_ids=None, **kwargs):
        state: SinkState = self._memsink_state
        if backbone and sequence_ids is None and state.current() is not None:
            return base.forward(self, *args, **kwargs)
        if not self.training and state.eval_mode == "activate" and state.eval_ids is not None:
            if sequence_ids is not None:  # one place for the IDs: never silently replace the caller's
                raise ValueError(
                    "sink mode 'activate' was set with its own sequence IDs, and this forward also got "
                    "sequence_ids: give them in one place (set_sink_mode('activate') without IDs uses "
                    "each forward's)"
                )
            sequence_ids = state.eval_ids
        ids = _checked_ids(sequence_ids, args, kwargs)
        _sync_adapter_wrappers(state.slots)
        if self.training and takes_use_cache and "use_cache" not in kwargs and kwargs.get("position_ids") is not None:
            # Packed rows (position_ids restarting per document) need Transformers' packed-sequence
            # attention masks, which a KV cache turns off; no cache is needed in training. Only
            # then: the packed-sequence check reads a tensor on the host (a device sync).
            kwargs["use_cache"] = False
        previous = state.enter(ids, self.training)
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            state.leave(previous)

    signature = inspect.signature(base.forward)
    params = [p for p in signature.parameters.values() if p.name != "sequence_ids"]
    new = inspect.Parameter("sequence_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
    params.insert(var_kw[0] if var_kw else len(params), new)
    forward.__signature__ = signature.replace(parameters=params)
    forward.__doc__ = (base.forward.__doc__ or "") + (
        "\n        sequence_ids (`torch.LongTensor` of shape `(batch_size,)` or `(batch_size, sequence_length)`):\n"
        "            hf_memsinks: the ID of each sequence (or token), which selects its sink neurons. -1 means\n"
        "            no sequence (no sink active). Required in training mode.\n"
    )
    mixin = _PatchedClass if backbone else MemSinkModelMixin
    cls = type(base.__name__, (mixin, base), {
        "forward": forward,
        "_memsink_base_class": base,
        "__module__": __name__,
        "__qualname__": base.__qualname__,
    })
    _MODEL_CLASSES[base, backbone] = cls
    return cls


# ---- loading --------------------------------------------------------------------------------------

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class AutoMemSinkModelForCausalLM:
    """``from_pretrained`` for memsink models, in the style of the ``Auto*`` classes."""

    def __init__(self, *args, **kwargs):
        raise EnvironmentError("use AutoMemSinkModelForCausalLM.from_pretrained(...) or .from_config(...)")

    @classmethod
    def from_config(cls, config, memsink_config: MemSinkConfig, **kwargs) -> PreTrainedModel:
        """A freshly initialised model of ``config``, patched."""
        return get_memsink_model(AutoModelForCausalLM.from_config(config, **kwargs), memsink_config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        memsink_config: MemSinkConfig | None = None, **kwargs) -> PreTrainedModel:
        """Restore a saved memsink checkpoint (it has ``memsink_config.json``), or load a plain
        model (local path or Hub name) and patch it with ``memsink_config``. Other arguments go
        to ``AutoModelForCausalLM.from_pretrained``."""
        path = pretrained_model_name_or_path
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        if os.path.isfile(path):
            raise ValueError(f"{path} is a file; pass the checkpoint directory (the one with config.json)")
        local = os.path.join(os.fspath(path), hub_kwargs.get("subfolder", "")) if os.path.isdir(path) else None
        if local is None and _looks_local(path):
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        config_file = find_config_file(local or path, **({} if local else hub_kwargs))
        sink_keys = _sink_tensor_keys(local) if local is not None else []  # also: every weights file readable
        if config_file is None:
            if sink_keys and memsink_config is None:
                raise ValueError(
                    f"{path} holds sink tensors ({sink_keys[0]}, ...) but no memsink_config.json: it is a memsink "
                    "checkpoint whose config was lost. Restore memsink_config.json (it holds the sink layout); "
                    "memsink_config=MemSinkConfig(...) works only with the exact settings of the training run, "
                    "and is checked against these tensors"
                )
            if memsink_config is None:
                if local is not None and not os.path.isfile(os.path.join(local, "config.json")):
                    raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
                if local is None:
                    raise FileNotFoundError(
                        f"{path} is not a local directory, and no memsink_config.json was found for it on the Hub "
                        "(no such model, or no network). For a plain model pass memsink_config=MemSinkConfig(...)"
                    )
                raise ValueError(
                    f"{path} holds no memsink_config.json, so it is a plain model: pass "
                    "memsink_config=MemSinkConfig(...) to patch it with sinks"
                )
            if not sink_keys:
                return get_memsink_model(AutoModelForCausalLM.from_pretrained(path, *model_args, **kwargs), memsink_config)
            model = get_memsink_model(_load_ignoring_sinks(path, *model_args, **kwargs), memsink_config)
            _load_sink_tensors(model, local, hub_kwargs, described_by="the memsink_config passed")
            return model
        if memsink_config is not None:
            raise ValueError(
                f"{path} is already a memsink checkpoint (it has {os.path.basename(config_file)}); "
                "load it without memsink_config, or load a plain base model to patch"
            )
        saved = MemSinkConfig.from_pretrained(config_file)
        model = _load_ignoring_sinks(path, *model_args, **kwargs)
        try:
            get_memsink_model(model, saved)
        except ValueError as err:
            raise ValueError(f"{config_file} does not match the weights of {path}: {err}") from None
        _load_sink_tensors(model, local or path, hub_kwargs, described_by=config_file)
        return model


def _looks_local(path) -> bool:
    """A path that cannot be a Hub repo id (``name`` or ``org/name``): absolute, relative with
    ``./``, ``~``, more than one ``/``, or characters repo ids do not have."""
    text = os.fspath(path)
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
            or not all(c.isalnum() or c in "-_./" for c in text))


def _sink_tensor_keys(path: str) -> list[str]:
    """Sink tensor names in the local safetensors files of ``path`` (headers only)."""
    from safetensors import safe_open

    keys = []
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        try:
            with safe_open(file, framework="pt") as f:
                keys += [k for k in f.keys() if k.endswith(SINK_KEY_MARKERS)]
        except Exception as err:  # safetensors' own error types
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    return keys


def _load_ignoring_sinks(path, *model_args, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` without the unused-weights report for sink tensors
    (they are loaded next)."""
    from transformers import AutoConfig

    config = kwargs.get("config")
    if config is None:
        hub = {k: kwargs[k] for k in _HUB_KWARGS + ("trust_remote_code",) if k in kwargs}
        config = AutoConfig.from_pretrained(path, **hub)
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        return AutoModelForCausalLM.from_pretrained(path, *model_args, **kwargs)
    base = mapping[type(config)]
    ignoring = type(base.__name__, (base,), {
        "_keys_to_ignore_on_load_unexpected": list(base._keys_to_ignore_on_load_unexpected or [])
        + [re.escape(marker) + "$" for marker in SINK_KEY_MARKERS],
        "__module__": base.__module__,
    })
    model = ignoring.from_pretrained(path, *model_args, **kwargs)
    model.__class__ = base
    return model


def _checkpoint_files(path, hub_kwargs: dict) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    else:
        from transformers.utils import cached_file

        index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if index is not None:
            import json

            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            files = [cached_file(path, n, **hub_kwargs) for n in names]
        else:
            files = [cached_file(path, "model.safetensors", **hub_kwargs)]
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


def _undo_key_renames(tensors: dict, expected: set[str]) -> dict:
    """Map sink keys that Transformers' save-time weight conversions renamed (Mixtral writes
    ``mlp`` as ``block_sparse_moe``) back to the model's names: same layer numbers, same module
    and tensor name, and only one such key."""
    def signature(key: str) -> tuple:
        parts = key.split(".")
        return tuple(p for p in parts if p.isdigit()), tuple(parts[-2:])

    by_signature: dict[tuple, list[str]] = {}
    for key in tensors:
        by_signature.setdefault(signature(key), []).append(key)
    out = dict(tensors)
    for key in expected - set(tensors):
        found = by_signature.get(signature(key), [])
        if len(found) == 1:
            out[key] = out.pop(found[0])
    return out


def _load_sink_tensors(model: PreTrainedModel, path, hub_kwargs: dict, described_by: str = "memsink_config.json") -> None:
    """Load the checkpoint's sink tensors; every sink the config describes must be there with
    its shape, and no other: a mismatch is an error naming the config and the checkpoint."""
    from safetensors import safe_open

    tensors = {}
    for file in _checkpoint_files(path, hub_kwargs):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key.endswith(SINK_KEY_MARKERS):
                        tensors[key] = f.get_tensor(key)
        except Exception as err:  # safetensors' own error types
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    expected = set(model.sink_parameters())
    tensors = _undo_key_renames(tensors, expected)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(
            f"{described_by} does not match the sink tensors of {path}: "
            + (f"it describes sinks the checkpoint lacks ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
               if missing else "")
            + ("; " if missing and extra else "")
            + (f"the checkpoint has sinks it does not describe ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
               if extra else "")
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{described_by} does not match the sink tensors of {path}: {err}") from None
