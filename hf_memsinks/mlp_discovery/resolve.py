"""Every MLP of a model, found once: named by the user, read from a checkpoint, or discovered.

Discovery (:mod:`hf_memsinks.mlp_discovery.search`) runs model forwards to check its candidates, so
what it found is kept as a :data:`FoundMLPs` record (plain JSON: the MLP names and each MLP's
width field). Checkpoints store the record, so restoring one runs no discovery and loads the same
after a Transformers upgrade; and it is cached per model class, config and set of module classes, so
patching a second model of the same kind runs none either, while a model whose modules were swapped
(a norm replaced by another kind) is checked again.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import nn

from .search import discover_sites
from .spec import MLPSite, MLPSpec, find_mlp_sites, spec_from_target_modules

FoundMLPs = dict[str, Any]  # {"specs": [MLPSpec fields], "width_attrs": {MLP name: config field or None}}

_FOUND: dict[tuple[type, str, frozenset], FoundMLPs] = {}


def mlp_sites(model: nn.Module, target_modules: dict | None = None, found: FoundMLPs | None = None) -> list[MLPSite]:
    """Every MLP of ``model``, in layer order: named by ``target_modules``, else by ``found`` (a
    checkpoint's record), else by what discovery found for this model class, config and module classes."""
    if target_modules is not None:
        return find_mlp_sites(model, spec_from_target_modules(target_modules))
    if found is None:
        key = (type(model), _config_key(model), frozenset(type(m) for m in model.modules()))
        if key not in _FOUND:
            _FOUND[key] = found_record(discover_sites(model))
        found = _FOUND[key]
    return sites_from_record(model, found)


def found_record(sites: list[MLPSite]) -> FoundMLPs:
    """The JSON record of how ``sites`` were found."""
    specs = []
    for site in sites:
        if site.spec not in specs:
            specs.append(site.spec)
    return {"specs": [dataclasses.asdict(s) for s in specs], "width_attrs": {s.name: s.width_attr for s in sites}}


def sites_from_record(model: nn.Module, found: FoundMLPs) -> list[MLPSite]:
    """The sites a record names, with their width fields; no forward runs."""
    try:
        specs = [MLPSpec(**{**spec, "in_proj": tuple(spec["in_proj"])}) for spec in found["specs"]]
        width_attrs = dict(found["width_attrs"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"the record of the model's MLPs is malformed ({err!r}): {found!r}") from None
    sites = [site for spec in specs for site in find_mlp_sites(model, spec)]
    if {s.name for s in sites} != set(width_attrs):
        raise ValueError(
            f"the recorded MLPs {sorted(width_attrs)} are not this model's ({sorted(s.name for s in sites)}): "
            "the checkpoint does not match the base model"
        )
    for site in sites:
        site.width_attr = width_attrs[site.name]
    return sorted(sites, key=lambda s: (s.layer, s.name))


def _config_key(model: nn.Module) -> str:
    """The model config without the fields that do not shape the model (where it came from)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    return json.dumps(config, sort_keys=True, default=str)
