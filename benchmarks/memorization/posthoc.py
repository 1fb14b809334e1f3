"""A post-hoc removal baseline for the standard model: zero the MLP neurons most specific to the
repeated documents (activation attribution), swept over how many are removed.

Specificity of a neuron = mean |activation| on repeated documents / mean |activation| on
general training documents; zeroing a neuron = zeroing its column of the output projection.
"""

from __future__ import annotations

import copy

import torch

from hf_memsinks.evaluation.memorization import pad_documents
from hf_memsinks.layers.neurons import neuron_dim
from hf_memsinks.mlp_discovery.resolve import mlp_sites


@torch.no_grad()
def _mean_abs_activation(model, docs, pad_id: int, batch_size: int = 64) -> list[torch.Tensor]:
    sites = mlp_sites(model)
    sums = [torch.zeros(s.width) for s in sites]
    count = 0
    current: dict[int, torch.Tensor] = {}
    handles = [s.out_proj.register_forward_pre_hook(
        lambda mod, args, k=k: current.__setitem__(k, args[0].detach())) for k, s in enumerate(sites)]
    try:
        model.eval()
        for start in range(0, len(docs), batch_size):
            tokens, mask = pad_documents(docs[start:start + batch_size], pad_id)
            device = next(model.parameters()).device
            model(input_ids=tokens.to(device), attention_mask=mask.long().to(device))
            m = mask.reshape(-1).float()
            for k in range(len(sites)):
                act = current[k].reshape(-1, current[k].shape[-1]).float().abs().cpu()
                sums[k] += (act * m[:, None]).sum(0)
            count += int(m.sum())
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def neuron_specificity(model, repeated, general, pad_id: int) -> list[torch.Tensor]:
    rep = _mean_abs_activation(model, repeated, pad_id)
    gen = _mean_abs_activation(model, general, pad_id)
    return [r / (g + 1e-6) for r, g in zip(rep, gen)]


def zero_top_neurons(model, scores: list[torch.Tensor], fraction: float):
    """A copy of ``model`` with the top ``fraction`` of neurons (by score, globally) zeroed."""
    pruned = copy.deepcopy(model)
    if fraction <= 0:
        return pruned
    flat = torch.cat(scores)
    k = int(round(fraction * flat.numel()))
    if k == 0:
        return pruned
    threshold = flat.topk(k).values[-1]
    sites = mlp_sites(pruned)
    with torch.no_grad():
        for site, score in zip(sites, scores):
            drop = score >= threshold
            out = site.out_proj
            dim = neuron_dim(out, "out")
            index = drop.nonzero().squeeze(1)
            out.weight.index_fill_(dim, index.to(out.weight.device), 0.0)
    return pruned
