"""The sink tensors in a state dict: how a patched projection, norm or experts module saves its
neurons and loads them back (what a whole checkpoint adds is :mod:`.format`).

A patched tensor holds general and sink neurons together; a state dict keeps them apart. The
module's own name (``weight``, ``bias``, ``gate_up_proj``, ...) holds the general neurons, with
zeros where the sinks were when the model config cannot express a narrower MLP, and
``sink_<name>`` the sinks, so plain Transformers loads the sink-free model. A projection's
layout and mask settings (:func:`memsink_layout`) go into the state dict's metadata and are
compared on load, so weights never land on the wrong neurons. Sinks stored apart from the general
neurons (:mod:`hf_memsinks.layers.sink_parts`) are saved and loaded the same way, each part into
its own parameter, so a resumed run's optimizer steps the parameters it left off with.

The layers only compute. This format reaches them through torch's public state-dict hooks, which
:func:`add_checkpoint_hooks` puts on each module as it is patched. The hooks sit in the module's
own hook tables, so deep copies and pickles keep them; their handles sit in its patch record
(``module.memsink.hooks``), so unpatching takes them away.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import sink_parts
from ..layers.experts import experts_layout, is_patched_experts
from ..layers.neurons import copy_into_spans, pad_chunks, pick

SINK = "sink_"  # a sink tensor's name: SINK + the name of the tensor it is part of


def add_checkpoint_hooks(module: nn.Module) -> None:
    """Save and load the patched ``module`` in the checkpoint format, until it is unpatched."""
    experts = is_patched_experts(module)
    save = _save_experts if experts else _save_projection
    load = _load_experts if experts else _load_projection
    module.memsink.hooks += [module.register_state_dict_post_hook(save),
                             module.register_load_state_dict_pre_hook(load)]


def memsink_layout(projection: nn.Module) -> dict:
    """What the checkpoint tensors of a patched projection mean: its neuron layout and the mask
    settings that decide which sinks belong to which sequence ID. Saved in the state dict's
    metadata and compared on load, so weights never land on the wrong neurons."""
    m, c = projection.memsink, projection.memsink.state.config
    return {"role": m.role, "general": m.general, "sinks": m.sinks, "chunks": m.chunks,
            "sink_active_prob": c.sink_active_prob, "salt": c.salt, "mask_scheme": c.mask_scheme,
            "per_layer_masks": c.per_layer_masks, "layer": m.layer if c.per_layer_masks else None}


# ---- saving (post-hooks of state_dict: the module's own tensors are in ``destination`` already) ---------


def _save_projection(module: nn.Module, destination: dict, prefix: str, local_metadata: dict) -> None:
    apart = sink_parts.parts(module)
    for name in apart:  # (saved as the sinks below)
        destination.pop(prefix + sink_parts.PREFIX + name, None)
    local_metadata["memsink"] = memsink_layout(module)
    m = module.memsink
    for name, dim in module.neuron_dims().items():
        if name in apart and m.external_width == m.general:  # the two parts as they are stored
            general, sinks = (_full(t.detach()) for t in (getattr(module, name), apart[name]))
            destination[prefix + name] = general.contiguous()
            destination[prefix + SINK + name] = sinks.contiguous()
            continue
        # (sharded, general and sink rows interleave across shards: the split needs the whole tensor)
        tensor = _full(sink_parts.whole(module, name).detach())
        general, sinks = module.split(tensor, dim)
        if m.external_width != m.general:  # zero-padded: the full tensor with its sinks zeroed
            general = tensor.clone()
            for start, n in m.sink_spans:
                general.narrow(dim, start, n).zero_()
        destination[prefix + name] = general.contiguous()
        destination[prefix + SINK + name] = sinks.contiguous()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (FSDP2 DTensor) gathered whole, else ``tensor``: full-state-dict export is
    what the checkpoint format is for."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _save_experts(module: nn.Module, destination: dict, prefix: str, local_metadata: dict) -> None:
    for name, (general, sinks) in module.general_and_sink_parts().items():
        dim, chunks, rows = experts_layout(module)[name]
        general = pad_chunks(general.detach(), dim, chunks, module.memsink.external_width, rows)
        destination[prefix + name] = general.contiguous()
        destination[prefix + SINK + name] = sinks.detach().contiguous()


# ---- loading (pre-hooks of the module's own loader) ----------------------------------------------------


def _load_projection(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                     missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    dims = module.neuron_dims()
    saved, mine = (local_metadata or {}).get("memsink"), memsink_layout(module)
    if saved is not None and saved != mine:
        differ = ", ".join(f"{k} {saved.get(k)!r} vs {mine[k]!r}" for k in mine if saved.get(k) != mine[k])
        error_msgs.append(
            f"sink layout mismatch for {prefix[:-1]}: the state dict was saved with another sink layout than "
            f"this model's (state dict vs this model: {differ}); its tensors would land on the wrong neurons"
        )
        _load_nothing(module, state_dict, prefix)
        return
    m, apart = module.memsink, sink_parts.parts(module)
    for name, dim in dims.items():
        for part, spans in ((name, m.general_spans), (SINK + name, m.sink_spans)):
            key = prefix + part
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = _checked_part(module, key, state_dict.pop(key), name, dim, general=part == name,
                                  errors=error_msgs)
            if value is None:
                continue
            with torch.no_grad():
                if name in apart:  # each part has a parameter of its own
                    (getattr(module, name) if part == name else apart[name]).copy_(value)
                else:
                    copy_into_spans(getattr(module, name), dim, spans, value)
    _leave_as_they_are(module, state_dict, prefix, _split_names(dims))


def _load_experts(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                  missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    g, s = module.memsink.general, module.memsink.sinks
    layout = experts_layout(module)
    for name, (dim, chunks, rows) in layout.items():
        for key, sinks, count in ((prefix + name, False, g), (prefix + SINK + name, True, s)):
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if not sinks and value.shape[dim] != g * rows * chunks:  # zero-padded general part
                value = pick(value, dim, module.neuron_spans(name, sinks=False,
                                                             width=value.shape[dim] // (rows * chunks)))
            if value.shape[dim] != count * rows * chunks:
                error_msgs.append(f"size mismatch for {key}: checkpoint has {tuple(value.shape)}")
                continue
            copy_into_spans(getattr(module, name), dim, module.neuron_spans(name, sinks), value)
    _leave_as_they_are(module, state_dict, prefix, _split_names(layout))


def _split_names(names) -> list[str]:
    """The module's tensors this format loads itself: the split ones and their sinks stored apart."""
    return [*names, *(sink_parts.PREFIX + n for n in names)]


def _leave_as_they_are(module: nn.Module, state_dict: dict, prefix: str, names: list[str]) -> None:
    """Torch's own loader runs after these hooks, on what is left of ``state_dict``: give it the
    module's tensors ``names`` as they now are, so it copies each onto itself (a no-op) instead of
    reporting it missing, and finds no state-dict entry of theirs (an apart sink part's) to load."""
    for name in names:
        state_dict.pop(prefix + name, None)
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            state_dict[prefix + name] = tensor


def _load_nothing(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Leave every tensor of the module as it is, and let torch's loader report none of its keys."""
    given = [k[len(prefix):] for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]
    for name in given:  # (its children's keys have a dot after the prefix)
        del state_dict[prefix + name]
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    for name, tensor in tensors:
        if name in given or isinstance(tensor, nn.Parameter):  # (a buffer may not be persistent)
            state_dict[prefix + name] = tensor


def _checked_part(module: nn.Module, key: str, value: torch.Tensor, name: str, dim: int, general: bool,
                  errors: list[str]) -> torch.Tensor | None:
    """The saved general or sink part ``value`` of a patched projection's parameter ``name``, in
    the module's layout, or None with the reason appended to ``errors``."""
    m, param = module.memsink, getattr(module, name)
    spans = m.general_spans if general else m.sink_spans
    expected, full = sum(n for _, n in spans), (m.general + m.sinks) * m.neuron_chunks
    layout = f"general={m.general}, sinks={m.sinks}"
    others = lambda t: [d for i, d in enumerate(t.shape) if i != dim]  # noqa: E731
    if value.dim() != param.dim() or others(value) != others(param):
        errors.append(f"size mismatch for {key}: the state dict has shape {tuple(value.shape)}, this "
                      f"model ({layout}) expects {tuple(param.shape)} up to the neuron dim {dim}")
        return None
    if general and value.shape[dim] == full != expected:
        # Zero-padded general part (config cannot describe a narrower MLP): take the general
        # positions; the sink positions must hold the padding zeros.
        if any(bool(value.narrow(dim, a, n).any()) for a, n in m.sink_spans):
            errors.append(f"{key}: the state dict's tensor has nonzero values where this model ({layout}) "
                          "keeps its sinks, so it was not saved with this sink layout")
            return None
        value = module.split(value, dim)[0]
    if value.shape[dim] != expected:
        errors.append(
            f"size mismatch for {key}: the state dict has {value.shape[dim]} {'general' if general else 'sink'} "
            f"neurons along dim {dim} (shape {tuple(value.shape)}), this model ({layout}) expects {expected}"
            + (f" (or {full} zero-padded)" if general and full != expected else "")
            + ": it was saved with another sink layout"
        )
        return None
    return value
