"""An MLP by its names (:class:`MLPSpec`), and the modules those names find in a model (:class:`MLPSite`).

Names come from the user's ``target_modules``, from discovery (:mod:`hf_memsinks.mlp_discovery.search`)
or from a checkpoint that recorded what discovery found (:mod:`hf_memsinks.mlp_discovery.resolve`).

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

from ..layers.neurons import neuron_dim
from ..transformers_internals import Conv1D


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


def spec_from_target_modules(target_modules: dict) -> MLPSpec:
    """The MLP named by the user's ``MemSinkConfig.target_modules`` (checked there)."""
    return MLPSpec(
        mlp=target_modules["mlp"],
        in_proj=tuple(target_modules["in_proj"]),
        out_proj=target_modules["out_proj"],
        width_attr=target_modules.get("width_attr"),
        in_proj_chunks=target_modules.get("in_proj_chunks", 1),
        norm=target_modules.get("norm"),
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
    spec: MLPSpec | None = None  # the names it was found by


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
            from ..layers.experts import experts_width

            if id(mlp) not in seen and experts_width(mlp) is not None:
                seen.add(id(mlp))
                sites.append(MLPSite(f"{name}.{spec.mlp}" if spec.mlp else name, _layer_index(name), [], mlp,
                                     experts_width(mlp), width_attr=spec.width_attr, kind="experts", spec=spec))
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
                             chunks=spec.in_proj_chunks, width_attr=spec.width_attr, norm=norm, spec=spec))
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
