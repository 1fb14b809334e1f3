"""Find a model's MLPs from its structure, for model types the table in
:mod:`hf_memsinks.architectures` does not list.

1. **Decoder layers**: the ``nn.ModuleList`` with the most parameters under the model's decoder
   (``model.get_decoder()``); a layer's index is its position there.
2. **MLP candidates in a layer** (outside attention modules): an output projection mapping a
   width ``W`` back to the width ``D`` it reads from, fed by input projections mapping ``D`` to
   ``W`` (plain or a gated pair) or to ``2W`` (fused gate+up), as ``nn.Linear`` or ``Conv1D``,
   wherever they sit (on an ``mlp`` module, on the layer itself as in OPT, in two sibling
   modules as in BERT); and batched mixture-of-experts modules (:mod:`hf_memsinks.experts`).
3. **Check**: sinks need the hidden neurons to be independent of each other, and removal needs
   the model to run with fewer of them. So for each kind of candidate, one model forward with the
   last quarter of its neurons deleted (an odd number, so whole attention heads never pass)
   must equal one with their output weights zeroed, and perturbing those weights must change
   the output (the projections are on the forward path).
   Candidates that fail are dropped; if none pass, the error lists what was found and why.
4. **Width field**: a config field (by value, names like ``*intermediate*`` first) is the MLP's
   width if building the model on the meta device with that field changed changes exactly those
   MLPs' widths to the new value. Without one, removal keeps the full width with zeros.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import MLPSite, MLPSpec, find_mlp_sites, neuron_dim
from .experts import check_experts_forward, experts_layout, experts_width
from .neurons import chunk_spans, pick
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
    return f"{list(spec.in_proj)} -> {spec.out_proj!r} on {where}{fused}"


# ---- 3. the check -----------------------------------------------------------------------------------


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    out = model(input_ids=x, **({"use_cache": False} if takes_cache else {}))
    return out.logits if hasattr(out, "logits") else out[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def check_site(model: nn.Module, site: MLPSite) -> str | None:
    """Why ``site`` is not an MLP whose neurons can be removed one by one (None: it is)."""
    if site.kind == "experts":
        check_experts_forward(site.out_proj, site.name)
    # An odd number of neurons: deleting whole attention heads (a multiple of head_dim) would
    # pass for neurons; experts keep widths grouped_mm can run (multiples of 8).
    cut = max(1, site.width // 4) | 1
    if site.kind == "experts":
        cut = max(8, site.width // 4 // 8 * 8) if site.width > 8 else 1
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    x = torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    modules = site.in_proj + [site.out_proj]
    calls = [0] * len(modules)
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, m in enumerate(modules)]
    shapes = []
    hooks.append(site.out_proj.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                with _edited(site, cut, "perturb"):
                    perturbed = _logits(model, x)
                if not all(calls):
                    return "its projections are not used by the model's forward"
                batch_first = all(s[0] == x.shape[0] or (len(s) == 2 and s[0] % x.shape[0] == 0) for s in shapes)
                if site.kind != "experts" and not batch_first:
                    return (f"its hidden activations have shape {shapes[0]} for a batch of {tuple(x.shape)}: sink "
                            "masks need the batch first, (batch, tokens, width) or (batch * tokens, width)")
                with _edited(site, cut, "zero"):
                    zeroed = _logits(model, x)
                with _edited(site, cut, "delete"):
                    deleted = _logits(model, x)
            except Exception as e:  # noqa: BLE001 - any failure disqualifies the candidate
                return ("the model's forward fails with fewer of its neurons (something else is sized by its "
                        "width, such "
                        f"as a norm over the hidden neurons): {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not _close(deleted, zeroed):
        return (f"deleting {cut} of its {site.width} hidden neurons is not the same as zeroing their output weights "
                f"(max logit difference {(deleted - zeroed).abs().max().item():.2e}): they are not independent neurons")
    if _close(perturbed, zeroed):
        return "its hidden neurons do not reach the model's output"
    return None


@contextlib.contextmanager
def _edited(site: MLPSite, cut: int, how: str) -> Iterator[None]:
    """Temporarily: the last ``cut`` hidden neurons' output weights zeroed / perturbed, or those
    neurons deleted. Restores the very same parameter objects afterwards."""
    keep = site.width - cut
    saved: list[tuple[nn.Module, str, object]] = []

    def put(module, name, value):
        saved.append((module, name, module.__dict__.get(name, module._parameters.get(name))))
        if isinstance(getattr(module, name, None), nn.Parameter):
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            module.__dict__[name] = value

    if site.kind == "experts":
        module = site.out_proj
        for name, (dim, chunks, rows) in experts_layout(module).items():
            t = getattr(module, name).data
            if how == "delete":
                put(module, name, pick(t, dim, chunk_spans(site.width, 0, keep, chunks, rows)))
            elif name == "down_proj":
                value = t.clone()
                tail = value.narrow(dim, keep, cut)
                tail.copy_(torch.randn_like(tail)) if how == "perturb" else tail.zero_()
                put(module, name, value)
        if how == "delete" and isinstance(getattr(module, "intermediate_dim", None), int):
            put(module, "intermediate_dim", keep)
    else:
        out = site.out_proj
        dim = neuron_dim(out, "out")
        value = out.weight.data.clone()
        if how == "delete":
            put(out, "weight", value.narrow(dim, 0, keep).contiguous())
            _put_features(put, out, "out", keep)
            for module in site.in_proj:
                d = neuron_dim(module, "in")
                spans = [(k * site.width, keep) for k in range(site.chunks)]
                put(module, "weight", pick(module.weight.data, d, spans).contiguous())
                if module.bias is not None:
                    put(module, "bias", pick(module.bias.data, 0, spans).contiguous())
                _put_features(put, module, "in", keep * site.chunks)
        else:
            tail = value.narrow(dim, keep, cut)
            tail.copy_(torch.randn_like(tail)) if how == "perturb" else tail.zero_()
            put(out, "weight", value)
    try:
        yield
    finally:
        for module, name, old in reversed(saved):
            if name in module._parameters:
                module._parameters[name] = old
            else:
                module.__dict__[name] = old


def _put_features(put, module: nn.Module, role: str, features: int) -> None:
    if isinstance(module, nn.Linear):
        put(module, "out_features" if role == "in" else "in_features", features)
    elif hasattr(module, "nf"):
        put(module, "nf" if role == "in" else "nx", features)


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
