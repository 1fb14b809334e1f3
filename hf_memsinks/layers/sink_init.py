"""``sink_init="copy"`` (part of ``MemSinkConfig.for_finetuning()``): new sinks start as copies of
pretrained neurons' input weights (output weights zero, so outputs do not change), features that
already fit text, so a fine-tune's repeated document finds its sinks the faster path."""

from __future__ import annotations

import torch

from .neurons import copy_into_spans, pick


@torch.no_grad()
def copy_init_sinks(sites, seed: int = 0) -> None:
    """Set every sink's input weights (and bias) to those of a general neuron of its MLP: a random
    permutation of them, cycled when there are more sinks, the same for every input projection of
    one MLP (gate and up). ``sites``: the patched MLPs (``PatchedMLP``)."""
    generator = torch.Generator().manual_seed(seed)
    for site in sites:
        order = torch.randperm(site.general, generator=generator)
        source = order.repeat(-(-site.sinks // site.general))[: site.sinks]
        for module in site.in_proj:
            m = module.memsink
            for name, dim in module.neuron_dims().items():
                param = getattr(module, name)
                chunks = pick(param, dim, m.general_spans).chunk(m.neuron_chunks, dim)
                copies = torch.cat([c.index_select(dim, source.to(c.device)) for c in chunks], dim)
                copy_into_spans(param, dim, m.sink_spans, copies)
