"""Find a model's MLPs from its structure, when the user does not name them.

1. **Decoder layers**: the ``nn.ModuleList`` with the most parameters under the model's decoder
   (``model.get_decoder()``); a layer's index is its position there.
2. **MLP candidates in a layer** (outside attention modules): an output projection mapping a
   width ``W`` back to the width ``D`` it reads from, fed by input projections mapping ``D`` to
   ``W`` (plain or a gated pair) or to ``2W`` (fused gate+up), as ``nn.Linear`` or ``Conv1D``,
   wherever they sit (on an ``mlp`` module, on the layer itself as in OPT, in two sibling
   modules as in BERT); and batched mixture-of-experts modules (:mod:`hf_memsinks.layers.experts`).
3. **Check** (:mod:`hf_memsinks.mlp_discovery.check`): sinks need the hidden neurons to be independent of
   each other, and removal needs the model to run with fewer of them. So for each kind of
   candidate, one model forward with the last quarter of its neurons deleted (an odd number, so
   whole attention heads never pass) must equal one with their output weights zeroed, and
   perturbing the output weights of as many of its first neurons must change the output (the
   projections are on the forward path; the last neurons can be silent, as the zero-padded sinks
   of a checkpoint being restored are). Candidates that fail are dropped; if none pass, the error
   lists what was found and why.
   **A norm over the hidden neurons** (BitNet's ``ffn_sub_norm``: a module of the MLP with
   parameters of size ``W``) makes that check fail, as neurons share its statistics. The candidate
   gets a second check with the norm: its output must be the output projection's input, neurons
   with zero input weights must be exactly zero there, and zeroing some neurons' input weights must
   equal zeroing them at the norm's input. Then the sinks are masked at the norm's input (an
   inactive sink is zero in its statistics) and removal keeps the full width with zeros.
4. **Width field** (:mod:`hf_memsinks.mlp_discovery.widths`): a config field (by value, names like
   ``*intermediate*`` first) is the MLP's width if building the model on the meta device with that
   field changed changes exactly those MLPs' widths to the new value. Without one, removal keeps
   the full width with zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

from torch import nn

from ..layers.experts import experts_width
from ..transformers_internals import Conv1D
from .check import check_site
from .spec import MLPSite, MLPSpec, find_mlp_sites
from .widths import find_width_fields

_NOT_MLP = re.compile(r"attn|attention", re.IGNORECASE)


def discover_sites(model: nn.Module) -> list[MLPSite]:
    """Every MLP site of ``model`` found from its structure, checked, with its width field."""
    layers_path = decoder_layers_path(model)
    specs: list[MLPSpec] = []
    skipped: dict[str, str] = {}
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    for layer in model.get_submodule(layers_path):
        for spec in _layer_specs(layer, layers_path, skipped, hidden):
            if spec not in specs:
                specs.append(spec)
    found: list[tuple[MLPSpec, list[MLPSite]]] = []
    rejected: dict[str, str] = dict(skipped)
    for spec in specs:
        try:
            sites = find_mlp_sites(model, spec)
            reason = check_site(model, sites[0])
            norm = _norm_over_neurons(model, sites[0]) if reason is not None and spec.kind == "mlp" else None
            if norm is not None:
                spec = dataclasses.replace(spec, norm=norm)
                sites = find_mlp_sites(model, spec)
                reason = check_site(model, sites[0])
        except NotImplementedError:
            raise
        except (TypeError, ValueError) as e:
            reason = str(e)
        if reason is None:
            found.append((spec, sites))
        else:
            rejected[_describe(spec)] = reason
    if not found:
        raise NotImplementedError(_no_mlp_message(model, layers_path, rejected))
    sites = [s for _, spec_sites in found for s in spec_sites]
    fields = find_width_fields(model, [spec for spec, _ in found], sites)
    for site in sites:
        site.width_attr = fields.get(site.name)
    return sorted(sites, key=lambda s: (s.layer, s.name))


# ---- 1. decoder layers ------------------------------------------------------------------------------


def decoder_layers_path(model: nn.Module) -> str:
    r"""Path of the decoder-layer list: among the model's ``nn.ModuleList``\ s, one as long as the
    text config's layer count, under ``model.get_decoder()``, with the most parameters (in that
    order of preference: a vision or audio tower can be larger than a tiny decoder)."""
    root = model
    with contextlib.suppress(Exception):
        decoder = model.get_decoder()
        if isinstance(decoder, nn.Module) and any(isinstance(m, nn.ModuleList) for m in decoder.modules()):
            root = decoder
    under_root = {id(m) for m in root.modules()}
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    best, best_key = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            key = (len(module) == count, id(module) in under_root, sum(p.numel() for p in module.parameters()))
            if best_key is None or key > best_key:
                best, best_key = name, key
    if best is None:
        raise NotImplementedError(
            f"{type(model).__name__} ({model.config.model_type}): found no list of decoder layers "
            f"(nn.ModuleList) to put sinks in. {_HOW_TO_NAME}"
        )
    return best


# ---- 2. candidates in one layer ---------------------------------------------------------------------


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or Conv1D."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if isinstance(module, Conv1D) else (w.shape[1], w.shape[0])


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _common_parent(paths: list[str]) -> str:
    parts = [_parent(p).split(".") if _parent(p) else [] for p in paths]
    common = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return ".".join(common)


def _in_module_list(layer: nn.Module, path: str) -> bool:
    """Whether ``path`` goes through an ``nn.ModuleList`` inside the layer (an ``nn.Sequential``
    MLP is fine; a list of expert MLPs is not)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and isinstance(layer.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return True
    return False


def _layer_specs(layer: nn.Module, layers_path: str, skipped: dict[str, str], hidden: int | None) -> list[MLPSpec]:
    specs = []
    for name, module in layer.named_modules():
        if name and not _NOT_MLP.search(name) and experts_width(module) is not None:
            specs.append(MLPSpec(name, (), "", None, layers=layers_path, kind="experts"))
    projections = {
        name: m for name, m in layer.named_modules()
        if name and isinstance(m, (nn.Linear, Conv1D)) and m.weight.dim() == 2 and not _NOT_MLP.search(name)
    }
    for out_name, out in projections.items():
        width, dim = _features(out)
        if hidden is not None and dim != hidden:
            continue
        ins = [n for n, m in projections.items() if n != out_name and _features(m)[0] == dim
               and _features(m)[1] in (width, 2 * width)
               and (width != dim or _parent(n) == _parent(out_name))]  # W = D: only within one module
        same_parent = [n for n in ins if _parent(n) == _parent(out_name)]
        ins = same_parent or ins
        plain = [n for n in ins if _features(projections[n])[1] == width]
        ins, chunks = (plain, 1) if plain else (ins, 2)
        if not ins:
            continue
        mlp = _common_parent(ins + [out_name])
        cut = len(mlp) + 1 if mlp else 0
        spec = MLPSpec(mlp, tuple(n[cut:] for n in ins), out_name[cut:], None, chunks, layers=layers_path)
        if any(_in_module_list(layer, n) for n in ins + [out_name]):
            skipped[_describe(spec)] = ("its projections sit in a module list inside the layer (experts as separate "
                                        "modules?): tokens are routed, so per-token sink masks cannot follow them")
            continue
        specs.append(spec)
    return specs


def _describe(spec: MLPSpec) -> str:
    if spec.kind == "experts":
        return f"experts module {spec.mlp!r}"
    where = f"{spec.mlp!r}" if spec.mlp else "the layer itself"
    fused = f" (fused x{spec.in_proj_chunks})" if spec.in_proj_chunks > 1 else ""
    norm = f" through the norm {spec.norm!r}" if spec.norm else ""
    return f"{list(spec.in_proj)} -> {spec.out_proj!r} on {where}{fused}{norm}"


# ---- 3. the check (hf_memsinks.mlp_discovery.check); a norm over the hidden neurons ------------------------


def _norm_over_neurons(model: nn.Module, site: MLPSite) -> str | None:
    """Path from the MLP module to its one submodule, other than the projections, whose
    parameters are all of the MLP's width (a norm over the hidden neurons), or None."""
    mlp = model.get_submodule(site.name)
    projections = {id(m) for m in site.in_proj + [site.out_proj]}
    found = [name for name, m in mlp.named_modules() if name and id(m) not in projections and not _NOT_MLP.search(name)
             and (shapes := [tuple(p.shape) for p in m.parameters(recurse=False)])
             and all(shape == (site.width,) for shape in shapes)]
    return found[0] if len(found) == 1 else None


_HOW_TO_NAME = (
    "Name the MLP of one decoder layer by hand: MemSinkConfig(target_modules={'mlp': 'mlp', "
    "'in_proj': ['gate_proj', 'up_proj'], 'out_proj': 'down_proj', 'width_attr': 'intermediate_size'}) "
    "(attribute paths inside a layer; print(model) shows them; 'mlp': '' if the projections sit on the layer)."
)


def _no_mlp_message(model: nn.Module, layers_path: str, rejected: dict[str, str]) -> str:
    found = "".join(f"\n  - {what}: {why}" for what, why in rejected.items())
    found = found or "\n  (no projection pair W -> D, D -> W)"
    return (
        f"hf_memsinks found no MLP it can put sinks in for model type {model.config.model_type!r} "
        f"({type(model).__name__}). Decoder layers: {layers_path!r}. Candidates in a layer:{found}\n{_HOW_TO_NAME}"
    )
