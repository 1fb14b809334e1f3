"""Where a model keeps its MLPs: the user's ``target_modules``, a table of exceptions, else
discovery from the model's structure (:mod:`hf_memsinks.discovery`). The table is the only
per-model knowledge in the package.

Every supported MLP is ``out_proj(act(in_proj(x)) [* in_proj2(x)])``: input projections that
produce the hidden neurons, elementwise ops, and one output projection that reads them. So the
sinks are handled entirely in those projections, whatever the MLP's own ``forward`` does
(Bloom and MPT add the residual inside it; OPT keeps fc1/fc2 on the decoder layer). One variant:
``out_proj(norm(act(in_proj(x)) * in_proj2(x)))`` with a norm over the hidden neurons that maps
zeros to zeros (BitNet's RMSNorm ``ffn_sub_norm``): the sinks are then applied at the norm's input
(an inactive sink is zero in its statistics), and removal keeps the full width with zeros.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class MLPSpec:
    """Names inside one decoder layer. ``mlp`` is the attribute path from the layer to the MLP
    ("" when the projections sit on the layer); ``in_proj_chunks`` is 2 when one projection holds
    gate and up stacked; ``width_attr`` is the config field with the MLP width (None when the
    model hard-codes it, as Bloom and MPT do)."""

    mlp: str
    in_proj: tuple[str, ...]
    out_proj: str
    width_attr: str | None
    in_proj_chunks: int = 1
    layers: str | None = None  # path of the decoder-layer list (None: search the whole model)
    kind: str = "mlp"  # "mlp": projection modules; "experts": batched expert weights (3-D parameters)
    norm: str | None = None  # path from the MLP to a norm over its hidden neurons feeding out_proj


# Only what discovery from structure (hf_memsinks.discovery) cannot infer, keyed by model type.
# Every type of the installed Transformers that discovery handles is absent on purpose: the
# coverage run (tests/coverage_models.py) shows it finds the MLPs and width fields of the types
# this table used to list (GPT-2's ``n_inner`` = None included).
ARCHITECTURES: dict[str, MLPSpec] = {}


def spec_for(model_type: str, target_modules: dict | None = None) -> MLPSpec:
    """The table's entry, or the user's ``MemSinkConfig.target_modules`` when given."""
    if target_modules is not None:
        return MLPSpec(
            mlp=target_modules["mlp"],
            in_proj=tuple(target_modules["in_proj"]),
            out_proj=target_modules["out_proj"],
            width_attr=target_modules.get("width_attr"),
            in_proj_chunks=target_modules.get("in_proj_chunks", 1),
            norm=target_modules.get("norm"),
        )
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise NotImplementedError(
        f"hf_memsinks does not know where the MLPs of model type {model_type!r} are. Name them: "
        "MemSinkConfig(target_modules={'mlp': 'mlp', 'in_proj': ['gate_proj', 'up_proj'], "
        "'out_proj': 'down_proj', 'width_attr': 'intermediate_size'}) with the attribute names of "
        "one decoder layer (print(model) shows them; 'mlp': '' if the projections sit on the layer). "
        f"Table entries: {', '.join(sorted(ARCHITECTURES)) or 'none'}."
    )


@dataclass
class MLPSite:
    """One MLP found in a model: its decoder-layer index and its projection modules."""

    name: str
    layer: int
    in_proj: list[nn.Module]
    out_proj: nn.Module
    width: int
    chunks: int = 1
    width_attr: str | None = None  # config field holding this MLP's width (dotted for sub-configs)
    kind: str = "mlp"  # "experts": ``out_proj`` is the experts module, ``in_proj`` empty
    norm: nn.Module | None = None  # a norm over the hidden neurons whose output is out_proj's input


def neuron_dim(module: nn.Module, role: str) -> int:
    """Which weight dimension indexes hidden neurons: Conv1D stores weights (in, out); a norm
    over the hidden neurons has 1-D parameters."""
    if role == "norm":
        return 0
    transposed = isinstance(module, Conv1D)
    if role == "in":
        return 1 if transposed else 0
    return 0 if transposed else 1


def mlp_sites(model: nn.Module, target_modules: dict | None = None) -> list[MLPSite]:
    """Every MLP of ``model``: named by ``target_modules`` or the table, else found from the
    model's structure (:mod:`hf_memsinks.discovery`)."""
    model_type = getattr(model.config, "model_type", None)
    if target_modules is not None or model_type in ARCHITECTURES:
        return find_mlp_sites(model, spec_for(model_type, target_modules))
    from .discovery import discover_sites

    return discover_sites(model)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split(".") if path else []:
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _check_projection(module: nn.Module, where: str) -> None:
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(
            f"{where} is a {type(module).__name__}; hf_memsinks patches nn.Linear and transformers' Conv1D "
            "projections (quantized or already-wrapped layers are not supported: patch before wrapping)"
        )
    if not module.weight.dtype.is_floating_point:
        raise TypeError(f"{where} has a {module.weight.dtype} weight; patch the model before quantizing it")


def find_mlp_sites(model: nn.Module, spec: MLPSpec) -> list[MLPSite]:
    """Every decoder layer's MLP, in layer order."""
    sites: list[MLPSite] = []
    seen: set[int] = set()
    if spec.layers is not None:
        prefix = spec.layers + "." if spec.layers else ""
        candidates = [(f"{prefix}{i}", layer) for i, layer in enumerate(model.get_submodule(spec.layers))]
    else:
        candidates = list(model.named_modules())
    for name, module in candidates:
        mlp = _get(module, spec.mlp) if spec.mlp else module
        if mlp is None:
            continue
        if spec.kind == "experts":
            from .experts import experts_width

            if id(mlp) not in seen and experts_width(mlp) is not None:
                seen.add(id(mlp))
                sites.append(MLPSite(f"{name}.{spec.mlp}" if spec.mlp else name, _layer_index(name), [], mlp,
                                     experts_width(mlp), width_attr=spec.width_attr, kind="experts"))
            continue
        out_proj = _get(mlp, spec.out_proj)
        in_proj = [_get(mlp, n) for n in spec.in_proj]
        if not isinstance(out_proj, nn.Module) or any(not isinstance(m, nn.Module) for m in in_proj):
            continue
        if id(out_proj) in seen:
            continue
        seen.add(id(out_proj))
        mlp_name = f"{name}.{spec.mlp}" if spec.mlp else name
        _check_projection(out_proj, f"{mlp_name}.{spec.out_proj}")
        for n, m in zip(spec.in_proj, in_proj):
            _check_projection(m, f"{mlp_name}.{n}")
        width = out_proj.weight.shape[neuron_dim(out_proj, "out")]
        for n, m in zip(spec.in_proj, in_proj):
            produced = m.weight.shape[neuron_dim(m, "in")]
            if produced != width * spec.in_proj_chunks:
                raise ValueError(
                    f"{mlp_name}.{n} produces {produced} features but {spec.out_proj} reads {width}"
                    + (f" x {spec.in_proj_chunks} chunks" if spec.in_proj_chunks > 1 else "")
                    + ": check target_modules / in_proj_chunks"
                )
        norm = None if spec.norm is None else _hidden_norm(mlp, spec.norm, f"{mlp_name}.{spec.norm}", width)
        sites.append(MLPSite(mlp_name, _layer_index(name), in_proj, out_proj, width,
                             chunks=spec.in_proj_chunks, width_attr=spec.width_attr, norm=norm))
    if not sites:
        raise ValueError(
            f"found no MLP with projections {spec.in_proj} -> {spec.out_proj} under attribute {spec.mlp!r}; "
            "set MemSinkConfig.target_modules to this model's names"
        )
    return sorted(sites, key=lambda s: s.layer)


def _hidden_norm(mlp: nn.Module, path: str, where: str, width: int) -> nn.Module:
    """The module at ``path`` of the MLP, which must be a norm over its ``width`` hidden neurons."""
    norm = _get(mlp, path)
    shapes = [tuple(p.shape) for p in norm.parameters(recurse=False)] if isinstance(norm, nn.Module) else []
    if not shapes or any(shape != (width,) for shape in shapes):
        raise ValueError(f"{where} is not a norm over the {width} hidden neurons (its parameters have shapes {shapes})")
    return norm


def _layer_index(name: str) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    if not numbers:
        raise ValueError(f"cannot tell the decoder-layer index of {name!r}: no numeric part in its path")
    return int(numbers[-1])


def select_layers(sites: list[MLPSite], layers: list[int] | None) -> list[MLPSite]:
    """Keep the sites whose layer index is listed (negative indices count from the end)."""
    if layers is None:
        return sites
    count = max(s.layer for s in sites) + 1
    wanted = set()
    for index in layers:
        resolved = index + count if index < 0 else index
        if not 0 <= resolved < count:
            raise ValueError(f"MemSinkConfig.layers: layer {index} does not exist (the model has {count} layers)")
        wanted.add(resolved)
    return [s for s in sites if s.layer in wanted]
