"""Is a candidate MLP one that sinks can go in? (Step 3 of :mod:`hf_memsinks.mlp_discovery.search`.)

Sinks need the hidden neurons to be independent of each other, and removal needs the model to
run with fewer of them. So one model forward with the last quarter of its neurons deleted (an odd
number, so whole attention heads never pass) must equal one with their output weights zeroed, and
perturbing the output weights of as many of its *first* neurons must change the output (the
projections are on the forward path; the last neurons can be silent, as the zero-padded sinks of
a checkpoint being restored are).

Behind a norm over the hidden neurons (BitNet's ``ffn_sub_norm``) neurons share the norm's
statistics, so instead: the norm's output must be what the output projection reads, neurons with
zero input weights must be exactly zero there, and zeroing some neurons' input weights must equal
zeroing them at the norm's input. Removal then keeps the full width, so no neuron is deleted.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import nn

from ..layers.experts import check_experts_forward, experts_layout
from ..layers.neurons import chunk_spans, neuron_dim, pick
from .spec import MLPSite


def check_site(model: nn.Module, site: MLPSite) -> str | None:
    """Why ``site`` is not an MLP whose neurons can take sinks (None: it is)."""
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
    layer = model.get_submodule(f"{site.spec.layers}.{site.layer}") if site.spec and site.spec.layers else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return (_check_with_norm if site.norm is not None else _check_plain)(model, site, x, cut, layer)
    finally:
        model.train(was_training)


def _check_plain(model: nn.Module, site: MLPSite, x: torch.Tensor, cut: int, layer: nn.Module | None) -> str | None:
    modules = site.in_proj + [site.out_proj]
    calls = [0] * len(modules)
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, m in enumerate(modules)]
    shapes = []
    hooks.append(site.out_proj.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape))))
    try:
        with _edited(site, cut, "perturb"):
            perturbed = _logits(model, x, layer)
        if not all(calls):
            return "its projections are not used by the model's forward"
        if site.kind != "experts" and (reason := _not_batch_first(shapes, x)):
            return reason
        with _edited(site, cut, "zero"):
            zeroed = _logits(model, x, layer)
        with _edited(site, cut, "delete"):
            deleted = _logits(model, x, layer)
    except Exception as e:  # noqa: BLE001 - any failure disqualifies the candidate
        return ("the model's forward fails with fewer of its neurons (something else is sized by its width, "
                f"such as a norm over the hidden neurons): {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        for h in hooks:
            h.remove()
    if not _close(deleted, zeroed):
        return (f"deleting {cut} of its {site.width} hidden neurons is not the same as zeroing their output weights "
                f"(max logit difference {(deleted - zeroed).abs().max().item():.2e}): they are not independent neurons")
    return _reaches_output(perturbed, zeroed)


def _check_with_norm(model: nn.Module, site: MLPSite, x: torch.Tensor, cut: int,
                     layer: nn.Module | None) -> str | None:
    keep = site.width - cut
    seen = {"norm_out": None, "fed": [], "shapes": [], "tail": []}

    def after_norm(module, args, output):
        seen["norm_out"] = output
        seen["shapes"].append(tuple(args[0].shape))

    def before_out(module, args):
        seen["fed"].append(args[0] is seen["norm_out"])
        seen["tail"].append(args[0][..., keep:])

    def zero_at_norm(module, args):
        h = args[0].clone()
        h[..., keep:] = 0
        return (h,) + tuple(args[1:])

    hooks = [site.norm.register_forward_hook(after_norm), site.out_proj.register_forward_pre_hook(before_out)]
    norm = site.norm.__class__.__name__
    try:
        with _edited(site, cut, "perturb"):
            perturbed = _logits(model, x, layer)
        if not seen["fed"] or not all(seen["fed"]):
            return f"the output of {norm} is not what its output projection reads"
        if reason := _not_batch_first(seen["shapes"], x):
            return reason
        with _edited(site, cut, "zero"):
            zeroed = _logits(model, x, layer)
        seen["tail"].clear()
        with _edited(site, cut, "zero_in"):
            silenced = _logits(model, x, layer)
        if any(bool(t.any()) for t in seen["tail"]):
            return (f"neurons with zero input weights are not zero after its norm over the hidden neurons ({norm}): "
                    "a masked sink would not be silent")
        hooks.append(site.norm.register_forward_pre_hook(zero_at_norm))
        masked = _logits(model, x, layer)
    except Exception as e:  # noqa: BLE001 - any failure disqualifies the candidate
        return f"the model's forward fails with its neurons edited: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        for h in hooks:
            h.remove()
    if not _close(silenced, masked):
        return (f"zeroing the input weights of {cut} of its {site.width} hidden neurons is not the same as zeroing "
                f"them at the input of its norm (max logit difference {(silenced - masked).abs().max().item():.2e}): "
                "they are not independent neurons up to the norm")
    return _reaches_output(perturbed, zeroed)


class _LayerOutput(Exception):
    """Raised by a hook to end a check forward once the site's decoder layer has run."""

    def __init__(self, output: torch.Tensor):
        self.output = output


def _stop_after(module, args, output):
    raise _LayerOutput(output if isinstance(output, torch.Tensor) else output[0])


def _logits(model: nn.Module, x: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
    """The model's output for ``x``, or, when ``layer`` is given, the output of that decoder layer
    (the site's own: an edit of its neurons shows there first, and the layers after it and the LM
    head would only multiply the cost of the check)."""
    takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    hook = layer.register_forward_hook(_stop_after) if layer is not None else None
    try:
        out = model(input_ids=x, **({"use_cache": False} if takes_cache else {}))
    except _LayerOutput as stop:
        return stop.output
    finally:
        if hook is not None:
            hook.remove()
    return out.logits if hasattr(out, "logits") else out[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def _not_batch_first(shapes: list[tuple], x: torch.Tensor) -> str | None:
    if all(s[0] == x.shape[0] or (len(s) == 2 and s[0] % x.shape[0] == 0) for s in shapes):
        return None
    return (f"its hidden activations have shape {shapes[0]} for a batch of {tuple(x.shape)}: sink masks need the "
            "batch first, (batch, tokens, width) or (batch * tokens, width)")


def _reaches_output(perturbed: torch.Tensor, zeroed: torch.Tensor) -> str | None:
    return "its hidden neurons do not reach the model's output" if _close(perturbed, zeroed) else None


# ---- temporary edits of a candidate's weights --------------------------------------------------------


@contextlib.contextmanager
def _edited(site: MLPSite, cut: int, how: str) -> Iterator[None]:
    """Temporarily: the last ``cut`` hidden neurons' output weights zeroed (``"zero"``), their
    input weights zeroed (``"zero_in"``), or those neurons deleted (``"delete"``); or the *first*
    ``cut`` neurons' output weights perturbed (``"perturb"``). Restores the very same parameter
    objects afterwards."""
    saved: list[tuple[nn.Module, str, object]] = []

    def put(module, name, value):
        saved.append((module, name, module.__dict__.get(name, module._parameters.get(name))))
        if isinstance(getattr(module, name, None), nn.Parameter):
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            module.__dict__[name] = value

    (_edit_experts if site.kind == "experts" else _edit_projections)(put, site, site.width - cut, cut, how)
    try:
        yield
    finally:
        for module, name, old in reversed(saved):
            if name in module._parameters:
                module._parameters[name] = old
            else:
                module.__dict__[name] = old


def _edit_output(value: torch.Tensor, dim: int, keep: int, cut: int, how: str) -> torch.Tensor:
    """``value`` (a clone) with the first ``cut`` neurons perturbed, or the last ``cut`` zeroed."""
    part = value.narrow(dim, 0 if how == "perturb" else keep, cut)
    part.copy_(torch.randn_like(part)) if how == "perturb" else part.zero_()
    return value


def _edit_experts(put, site: MLPSite, keep: int, cut: int, how: str) -> None:
    module = site.out_proj
    for name, (dim, chunks, rows) in experts_layout(module).items():
        t = getattr(module, name).data
        if how == "delete":
            put(module, name, pick(t, dim, chunk_spans(site.width, 0, keep, chunks, rows)))
        elif name == "down_proj":
            put(module, name, _edit_output(t.clone(), dim, keep, cut, how))
    if how == "delete" and isinstance(getattr(module, "intermediate_dim", None), int):
        put(module, "intermediate_dim", keep)


def _edit_projections(put, site: MLPSite, keep: int, cut: int, how: str) -> None:
    out = site.out_proj
    dim = neuron_dim(out, "out")
    if how == "delete":
        put(out, "weight", out.weight.data.narrow(dim, 0, keep).contiguous())
        _put_features(put, out, "out", keep)
        spans = chunk_spans(site.width, 0, keep, site.chunks)
        for module in site.in_proj:
            put(module, "weight", pick(module.weight.data, neuron_dim(module, "in"), spans))
            if module.bias is not None:
                put(module, "bias", pick(module.bias.data, 0, spans))
            _put_features(put, module, "in", keep * site.chunks)
    elif how == "zero_in":
        for module in site.in_proj:
            for name, d in (("weight", neuron_dim(module, "in")), ("bias", 0)):
                if getattr(module, name, None) is not None:
                    value = getattr(module, name).data.clone()
                    for start, n in chunk_spans(site.width, keep, cut, site.chunks):
                        value.narrow(d, start, n).zero_()
                    put(module, name, value)
    else:
        put(out, "weight", _edit_output(out.weight.data.clone(), dim, keep, cut, how))


def _put_features(put, module: nn.Module, role: str, features: int) -> None:
    if isinstance(module, nn.Linear):
        put(module, "out_features" if role == "in" else "in_features", features)
    elif hasattr(module, "nf"):
        put(module, "nf" if role == "in" else "nx", features)
