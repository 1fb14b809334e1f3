"""MLP widths in the model config, and the width each patched MLP has in checkpoints.

A model config sizes its MLPs through width fields (``intermediate_size``; dotted for
sub-configs). Saved checkpoints must load in plain Transformers, so a field is set to the width
the MLPs it sizes have now, when they all have one; otherwise (no field, as Bloom and MPT
hard-code the width, or only some layers patched) the checkpoint keeps the original width,
zero-padded. Which field sizes which MLP is found by rebuilding the model on the meta device
(:func:`find_width_fields`), for models whose MLPs were found from structure.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from ..config import did_you_mean
from .spec import MLPSite, MLPSpec, find_mlp_sites

_WIDTH_NAMES = re.compile(r"inter|ffn|inner|mlp|ff_|_ff|expert|moe|hidden_dim", re.IGNORECASE)
_MAX_FIELD_TRIES = 10


def check_width_field(model: PreTrainedModel, width_attr: str | None) -> None:
    """A width field the model config lacks (a misspelling) would be set on the config as a new,
    ignored attribute, leaving the real width wrong in saved checkpoints."""
    if width_attr is None or hasattr(model.config, width_attr):
        return
    fields = [k for k in model.config.to_dict() if isinstance(getattr(model.config, k, None), (int, type(None)))]
    raise ValueError(
        f"MemSinkConfig.target_modules: width_attr {width_attr!r} is not a field of {type(model.config).__name__}"
        + did_you_mean(width_attr, fields)
        + "; name the config field holding the MLP width, or None if the model hard-codes it"
    )


def plan_widths(model: PreTrainedModel, widths: dict[str, int], original_widths: dict[str, int],
                width_attrs: dict[str, str | None]) -> dict[str, int]:
    """Make the model config describe MLPs of ``widths`` (patched MLPs; the rest keep theirs).

    Args:
        model: the model whose config is updated in place.
        widths: MLP name -> the width it has now (patched MLPs only).
        original_widths: MLP name -> width before patching (every MLP).
        width_attrs: MLP name -> the config field sizing it, or None.

    Returns:
        MLP name -> the width its tensors get in checkpoints (the new width, or the original one
        when the config cannot express it: zero-padded).
    """
    all_widths = {**original_widths, **widths}
    by_field: dict[str | None, list[str]] = {}
    for name in all_widths:
        by_field.setdefault(width_attrs.get(name), []).append(name)
    external: dict[str, int] = {}
    settings: dict[str, int] = {}  # applied only once every MLP is known to fit: a refusal changes nothing
    for field, names in by_field.items():
        values = {all_widths[n] for n in names}
        if field is not None and len(values) == 1:
            settings[field] = values.pop()
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
    for field, value in settings.items():
        set_field(model.config, field, value)
    return external


# ---- which field sizes which MLP ---------------------------------------------------------------------


def _int_fields(config, prefix: str = "", depth: int = 0) -> list[tuple[str, int | None]]:
    """Integer fields, and unset (None) ones named like a width (GPT-2's ``n_inner``: None means
    4 x hidden), of the config and its sub-configs."""
    fields = []
    for key, value in config.to_dict().items():
        attr = getattr(config, key, None)
        if (isinstance(attr, int) and not isinstance(attr, bool)) or (attr is None and _WIDTH_NAMES.search(key)):
            fields.append((prefix + key, attr))
        elif depth == 0 and hasattr(attr, "to_dict") and hasattr(attr, "model_type"):
            fields += _int_fields(attr, f"{prefix}{key}.", 1)
    return fields


def set_field(config, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        config = getattr(config, part)
    setattr(config, last, value)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def find_width_fields(model: nn.Module, specs: list[MLPSpec], sites: list[MLPSite]) -> dict[str, str]:
    """Site name -> config field that sets its width (sites without one are left out).

    A field (by value, names like ``*intermediate*`` first) is an MLP's width if building the
    model on the meta device with that field changed changes exactly those MLPs' widths to the
    new value and nothing else's shape."""
    widths = {s.name: s.width for s in sites}
    shapes = {name: p.shape for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    site_params = {s.name: {names[id(p)] for m in s.in_proj + [s.out_proj] + ([s.norm] if s.norm is not None else [])
                            for p in m.parameters(recurse=False)} for s in sites}
    candidates = [(path, v) for path, v in _int_fields(model.config) if v is None or v in set(widths.values())]
    candidates.sort(key=lambda c: (_WIDTH_NAMES.search(c[0].rpartition(".")[2]) is None, c[1] is None, c[0].count(".")))
    assigned: dict[str, str] = {}
    for path, value in candidates[:_MAX_FIELD_TRIES]:
        if value is not None and all(n in assigned for n, w in widths.items() if w == value):
            continue
        new_value = (value if value is not None else max(widths.values())) + 8
        config = copy.deepcopy(model.config)
        try:
            set_field(config, path, new_value)
            with _quiet(), torch.device("meta"):
                meta = type(model)(config)
            rebuilt = {s.name: s.width for spec in specs for s in find_mlp_sites(meta, spec)}
            reshaped = {n for n, p in meta.named_parameters() if shapes.get(n) != p.shape}
        except Exception:  # noqa: BLE001 - a field the model cannot be built with is not the width
            continue
        changed = {n: w for n, w in rebuilt.items() if widths.get(n) != w}
        if reshaped - set().union(*(site_params[n] for n in changed)):
            continue  # the field also sizes something that is not one of these MLPs
        if changed and all(w == new_value and (value is None or widths.get(n) == value) and n not in assigned
                           for n, w in changed.items()):
            assigned.update((n, path) for n in changed)
    return assigned
