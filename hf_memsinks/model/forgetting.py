"""Forgetting chosen documents: delete their sinks, and say how targeted that can be.

A document's memorization lives in its own sinks, and is reachable only where those sinks are
switched on: in eval mode ``"activate"`` with the document's ID (a model served with IDs). To
forget documents, :func:`forget_sinks` zeroes the sinks their IDs switch on (input and output
weights), in place, on the patched model; the model stays patched and every mode sees the
deletion. Other documents lose only the sinks they share with the forgotten ones.

How targeted that is depends on how much of the sink pool the forgotten IDs cover: with sink
activation probability ``p``, ``n`` IDs switch on ``1 - (1 - p)**n`` of all sinks
(:func:`expected_coverage`; ``p = 0.3``: 30% for one ID, 99.7% for 16). Deleting 16 IDs' sinks
at the default ``p`` deletes nearly every sink, which is ``remove_sinks()``, whichever IDs are
named. A small ``p`` (each document's sinks a small share of a large pool) keeps it targeted.
"""

from __future__ import annotations

import warnings

import torch

from ..ids.masks import sink_mask
from ..ids.validation import check_id_list
from ..layers.neurons import neuron_dim
from ..layers.sink_parts import parts

# Above this share of all sinks, deleting the given IDs' sinks is close to deleting every sink.
COVERAGE_WARNING = 0.5


def expected_coverage(num_ids: int, sink_active_prob: float) -> float:
    """Expected share of sinks that at least one of ``num_ids`` independent IDs switches on."""
    return 1.0 - (1.0 - float(sink_active_prob)) ** int(num_ids)


def forgotten_sinks(model, site, sequence_ids) -> torch.Tensor:
    """Bool ``(S,)``: the sinks of one patched MLP that any of ``sequence_ids`` switches on."""
    config = model.memsink_config
    layer = site.layer if config.per_layer_masks else None
    ids = check_id_list(sequence_ids, "forgotten_sinks(sequence_ids=)")
    return sink_mask(ids, site.sinks, config.sink_active_prob, salt=config.salt, layer=layer,
                     scheme=config.mask_scheme).any(0)


def sink_coverage(model, sequence_ids) -> float:
    """Measured share of the model's sinks (all patched MLPs together) that ``sequence_ids`` switch on."""
    sequence_ids = check_id_list(sequence_ids, "sink_coverage(sequence_ids=)")
    hit = total = 0
    for site in model.memsink.sites:
        hit += int(forgotten_sinks(model, site, sequence_ids).sum())
        total += site.sinks
    return hit / max(total, 1)


def coverage_warning(model, sequence_ids, what: str) -> float:
    """Warn when the IDs' sinks are most of all sinks; returns the measured coverage."""
    ids = check_id_list(sequence_ids, what)
    coverage = sink_coverage(model, ids)
    if coverage > COVERAGE_WARNING:
        p = model.memsink_config.sink_active_prob
        warnings.warn(
            f"{what}: the {ids.numel()} IDs switch on {coverage:.0%} of all sinks (expected 1 - (1 - p)^n = "
            f"{expected_coverage(ids.numel(), p):.0%} at sink_active_prob={p}), so this deletes most "
            "sinks and is little more targeted than remove_sinks(). Targeted forgetting needs a small "
            "sink_active_prob (docs/guide.md, 'Forgetting chosen documents').", UserWarning, stacklevel=3)
    return coverage


@torch.no_grad()
def forget_sinks(model, sequence_ids) -> float:
    """Zero, in place, every sink that ``sequence_ids`` switch on (its input rows, biases, output
    column and norm weights in every patched MLP). The model stays patched: serve it in ``"activate"``
    mode, where each document's memorization is reachable only through its own sinks, and the
    forgotten documents' is gone. Returns the share of all sinks deleted."""
    ids = check_id_list(sequence_ids, "forget_sinks(sequence_ids=)")
    if any(site.kind == "experts" for site in model.memsink.sites):
        raise NotImplementedError(
            "forget_sinks() edits dense MLP projections only; for a mixture-of-experts model use "
            "remove_sinks(forget_ids=...), which slices every expert"
        )
    coverage = coverage_warning(model, ids, "forget_sinks")
    for site in model.memsink.sites:
        gone = forgotten_sinks(model, site, ids).nonzero().squeeze(1)
        if gone.numel() == 0:
            continue
        width = site.general + site.sinks
        for module in site.in_proj:
            apart = parts(module)  # (sinks stored apart: the weight holds general rows only)
            if not apart:
                rows = torch.cat([k * width + site.general + gone for k in range(site.chunks)])
                module.weight.index_fill_(neuron_dim(module, "in"), rows.to(module.weight.device), 0.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.index_fill_(0, rows.to(module.bias.device), 0.0)
            own = torch.cat([k * site.sinks + gone for k in range(site.chunks)])  # rows of the apart sinks
            for name, part in apart.items():
                part.data.index_fill_(module.neuron_dims()[name], own.to(part.device), 0.0)
        out = site.out_proj
        if not parts(out):
            out.weight.index_fill_(neuron_dim(out, "out"), (site.general + gone).to(out.weight.device), 0.0)
        for part in parts(out).values():
            part.data.index_fill_(neuron_dim(out, "out"), gone.to(part.device), 0.0)
        if site.norm is not None:  # a norm over the hidden neurons: its per-neuron weights of those sinks
            for param in site.norm.parameters(recurse=False):
                param.index_fill_(0, (site.general + gone).to(param.device), 0.0)
    return coverage

