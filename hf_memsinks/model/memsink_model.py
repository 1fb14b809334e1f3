"""The patched model: forward with ``sequence_ids``, eval modes, ``remove_sinks`` (the exact
inverse, like PEFT's ``merge_and_unload``) and ``save_pretrained``.

The patched model is the user's own model object whose class is swapped for a subclass of its
class (same name), so ``isinstance``, ``Trainer``, ``generate`` and ``save_pretrained`` keep
working and ``config.architectures`` stays what it was. Its backbone (``model.base_model``) gets a
subclass too, so callers that run the backbone directly can pass IDs. Both carry one added
attribute, ``memsink`` (a :class:`ModelPatch`); ``remove_sinks`` deletes it and restores the classes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from ..checkpoints.format import save_checkpoint
from ..config import MemSinkConfig
from ..ids.validation import check_id_list, check_sequence_ids
from ..layers.adapters import check_unwrapped
from ..layers.experts import is_patched_experts
from ..layers.mlp import PatchedMLP
from ..layers.projections import is_patched_projection
from ..layers.state import EVAL_MODES, PAPER_MODE_NAMES, SinkState
from ..mlp_discovery.widths import plan_widths
from ..publishing.pushes import check_model_push
from ..publishing.upload_gate import allow_sinks_upload as sinks_upload_allowed
from ..publishing.upload_gate import register
from .forgetting import coverage_warning, forget_sinks, forgotten_sinks
from .forward import patched_forward
from .gradient_checkpointing import CheckpointingMixin, unwrap_checkpointing


@dataclass
class ModelPatch:
    """What ``get_memsink_model`` did to a model, and what ``remove_sinks`` undoes."""

    config: MemSinkConfig
    state: SinkState  # eval mode and the current forward call, shared by every patched module
    sites: list[PatchedMLP]  # the patched MLPs
    width_attrs: dict[str, str | None]  # MLP name -> config field holding its width (every MLP)
    original_widths: dict[str, int]  # MLP name -> width before patching (every MLP)
    found_mlps: dict  # how the MLPs were found (hf_memsinks.mlp_discovery.resolve), saved with checkpoints
    base_class: type  # the model's class before patching
    backbone_class: type | None = None  # the backbone's, when it is a separate module
    slots: list = field(default_factory=list)  # where each patched projection sits (hf_memsinks.integrations.peft)
    sink_lr_attached: bool = False  # an optimizer applies config.sink_lr_scale (hf_memsinks.integrations.optimizer)
    sink_rule_attached: bool = False  # an optimizer steps the sinks by config.sink_optimizer's rule
    sink_lr_warned: bool = False  # training ran without those optimizer hooks, and was told so once
    routing: Any = None  # the sightings' counts (general_sightings, sinks_from_sighting), made by the first forward
    #                     that counts (hf_memsinks.sightings)
    counts_kept: bool = False  # an optimizer saves and restores those counts with its state
    general_trained: bool = False  # a training forward since the optimizer's last step trained the general path
    general_held: bool = False  # an optimizer holds the general path on steps that did not (general_sightings)


def is_memsink_model(model: nn.Module) -> bool:
    return isinstance(model, MemSinkModelMixin)


class _PatchedClass(CheckpointingMixin):
    """What the patched model and its patched backbone share: checkpointing enabled after
    patching (:mod:`hf_memsinks.model.gradient_checkpointing`) and pickling."""

    def __reduce_ex__(self, protocol):
        """The class is made at patch time, so pickle cannot find it by name: rebuild it from the
        original class (importable) on load, then restore the instance state as usual."""
        backbone = not isinstance(self, MemSinkModelMixin)
        base = self.memsink.backbone_class if backbone else self.memsink.base_class
        return _new_patched_model, (base, backbone), self.__dict__


class MemSinkModelMixin(_PatchedClass):
    """Methods every patched model gains. Mixed in ahead of the model's own class."""

    memsink: ModelPatch

    @property
    def memsink_config(self) -> MemSinkConfig:
        return self.memsink.config

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
            raise ValueError(f"unknown sink mode {mode!r}; use one of {EVAL_MODES} (or the paper's "
                             f"{tuple(PAPER_MODE_NAMES)})")
        ids = None
        if sequence_ids is not None:
            if mode in ("drop", "expected"):
                raise ValueError(f"sink mode {mode!r} takes no sequence IDs")
            ids = check_sequence_ids(sequence_ids, "set_sink_mode(sequence_ids=)")
            if ids.dim() > 2:
                raise ValueError("set_sink_mode(sequence_ids=) must have shape (batch,) or (batch, seq_len), "
                                 f"got {tuple(ids.shape)}")
        elif mode == "exclude":
            raise ValueError("sink mode 'exclude' needs the sequence IDs whose sinks to exclude")
        self.memsink.state.eval_mode = mode
        self.memsink.state.eval_ids = ids

    @contextlib.contextmanager
    def sink_mode(self, mode: str, sequence_ids: Any = None) -> Iterator["MemSinkModelMixin"]:
        """Context manager form of :meth:`set_sink_mode`; restores the previous mode on exit."""
        state = self.memsink.state
        previous = (state.eval_mode, state.eval_ids)
        self.set_sink_mode(mode, sequence_ids)
        try:
            yield self
        finally:
            state.eval_mode, state.eval_ids = previous

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
        share is most of them. See :mod:`hf_memsinks.model.forgetting`."""
        return forget_sinks(self, sequence_ids)

    def remove_sinks(self, forget_ids: Iterable[int] | torch.Tensor | None = None) -> PreTrainedModel:
        """Turn this model, in place, into a plain model of its original class and return it.

        The config loses every trace of sinks, and no attribute or class of ``hf_memsinks`` is
        left on any module. Copy the model first (``copy.deepcopy``) to keep the patched one.

        Args:
            forget_ids: None (default): sinks are deleted and the eval scaling is folded into the
                general weights; logits equal this model's default eval mode (``"drop"``). Else
                sequence IDs: every sink is kept at its expected value except the sinks of those
                IDs, which are zeroed (``"exclude"`` mode folded into plain weights).

        Returns:
            This model, of its original class.
        """
        patch = self.memsink
        check_unwrapped(patch.slots)
        ids = None
        if forget_ids is not None:
            ids = check_id_list(forget_ids, "forget_ids", if_empty="pass None to drop every sink")
            _check_foldable(self, patch)
            coverage_warning(self, ids, "remove_sinks(forget_ids=...)")
        widths = {s.name: s.kept_width(ids) for s in patch.sites}
        external = plan_widths(self, widths, patch.original_widths, patch.width_attrs)
        p = patch.config.sink_active_prob
        with torch.no_grad():
            for site in patch.sites:
                if ids is None:
                    site.fold(patch.config.general_eval_scale, None, external[site.name])
                else:
                    site.fold(1.0, p * (~forgotten_sinks(self, site, ids)).float(), external[site.name])
        unwrap_checkpointing(self)
        backbone = self.base_model
        if backbone is not self:
            del backbone.memsink
            backbone.__class__ = patch.backbone_class
        del self.memsink
        self.__class__ = patch.base_class
        return self

    # -- checkpoints --

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False,
                        allow_sinks_upload: str | None = None, **kwargs):
        """Save like any Transformers model, plus ``memsink_config.json`` and a model card that
        says the checkpoint holds memorized data. Plain ``AutoModelForCausalLM`` loads the result
        as the sink-free model (sink tensors unused); ``AutoMemSinkModelForCausalLM.from_pretrained``
        restores the sinks.

        Atomic (:func:`hf_memsinks.checkpoints.atomic.atomic_save`): everything is written into a staging
        directory next to ``save_directory`` and swapped in at once, so a crash at any point leaves
        the previous checkpoint there loadable; files of that directory which this save does not
        write are kept. ``push_to_hub=True`` is refused, before anything is written, unless
        ``allow_sinks_upload`` opts in (see :meth:`push_to_hub`)."""
        if not push_to_hub:
            return save_checkpoint(self, save_directory, super().save_pretrained, *args, **kwargs)
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.abspath(os.fspath(save_directory))))
        push = {k: kwargs.pop(k) for k in ("commit_message", "commit_description", "private", "create_pr",
                                           "revision", "tags") if k in kwargs}
        check_model_push(allow_sinks_upload, f"save_pretrained(push_to_hub=True, repo_id={repo_id!r})", push)
        save_checkpoint(self, save_directory, super().save_pretrained, *args, **kwargs)
        for k in ("token", "max_shard_size"):
            if k in kwargs:
                push[k] = kwargs[k]
        return self.push_to_hub(repo_id, allow_sinks_upload=allow_sinks_upload, **push)

    def push_to_hub(self, repo_id: str, *args, allow_sinks_upload: str | None = None, **kwargs):
        """Refused: this model still has its sinks, which hold memorized training data. Publish
        ``remove_sinks()`` (or ``hf-memsinks export``) instead. ``allow_sinks_upload=
        hf_memsinks.SINKS_UPLOAD_CONSENT`` uploads it, memsink config included, to a private
        repository only (to resume training elsewhere)."""
        check_model_push(allow_sinks_upload, f"push_to_hub({repo_id!r})", kwargs)
        with sinks_upload_allowed(repo_id, allow_sinks_upload):
            return super().push_to_hub(repo_id, *args, **{**kwargs, "private": True})


def _check_foldable(model: PreTrainedModel, patch: ModelPatch) -> None:
    """``remove_sinks(forget_ids=...)`` folds sinks at their expected value into plain weights,
    which a norm over the hidden neurons makes impossible."""
    normed = [s.name for s in patch.sites if s.norm is not None]
    if normed:
        raise NotImplementedError(
            f"remove_sinks(forget_ids=...) cannot fold model type {model.config.model_type!r} into plain weights "
            f"exactly: its MLP normalises over the hidden neurons ({normed[0]}), so sinks at their expected "
            "value (a fraction of each, before the norm) have no plain-weight form. remove_sinks() without "
            "forget_ids is exact; or forget_sinks(ids) and serve the patched model")


def _new_patched_model(base: type, backbone: bool = False) -> PreTrainedModel:
    """Unpickling: an empty instance of the patched class of ``base`` (state is set next)."""
    cls = memsink_class(base, backbone)
    model = cls.__new__(cls)
    if not backbone:
        register(model)  # a copy with sinks: the upload gate must know its adapters too
    return model


def remove_sinks(model: nn.Module, forget_ids=None) -> PreTrainedModel:
    """Function form of ``model.remove_sinks()``, with a clear error for unpatched models.

    Args:
        model: a model patched by ``get_memsink_model``.
        forget_ids: as for :meth:`MemSinkModelMixin.remove_sinks`.

    Returns:
        ``model``, now a plain model of its original class.
    """
    if not is_memsink_model(model):
        raise ValueError(
            f"{type(model).__name__} has no memsinks: it was never patched with get_memsink_model, "
            "or its sinks were already removed"
        )
    return model.remove_sinks(forget_ids=forget_ids)


# ---- the patched classes ----------------------------------------------------------------------------

_MODEL_CLASSES: dict[tuple[type, bool], type] = {}


def memsink_class(base: type, backbone: bool = False) -> type:
    """``base`` with a forward that takes ``sequence_ids`` and runs as one sink call.

    For the model: :class:`MemSinkModelMixin` in front. For its backbone (``model.base_model``):
    only the forward, checkpointing and pickling support, and a forward without IDs inside the
    model's own call (the usual path) joins that call. Every other forward starts its own call, so
    it sees its own IDs or, in training without any, raises.

    The subclass keeps ``base``'s name (so ``config.architectures`` is unchanged) and exposes
    ``base.forward``'s signature plus ``sequence_ids``, which is what ``Trainer`` reads to decide
    which dataset columns to keep and what ``generate`` reads to validate its kwargs.
    """
    if (base, backbone) not in _MODEL_CLASSES:
        mixin = _PatchedClass if backbone else MemSinkModelMixin
        _MODEL_CLASSES[base, backbone] = type(base.__name__, (mixin, base), {
            "forward": _forward_with_ids(base, backbone),
            "__module__": __name__,
            "__qualname__": base.__qualname__,
        })
    return _MODEL_CLASSES[base, backbone]


def _forward_with_ids(base: type, backbone: bool):
    """``base.forward``'s signature plus ``sequence_ids``, running :func:`patched_forward`."""
    takes_use_cache = "use_cache" in inspect.signature(base.forward).parameters

    def forward(self, *args, sequence_ids=None, **kwargs):
        return patched_forward(self, base, backbone, takes_use_cache, sequence_ids, args, kwargs)

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
    return forward
