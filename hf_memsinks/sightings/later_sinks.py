"""``MemSinkConfig.sinks_from_sighting``: a document's sinks switch on from its K-th sighting.

A document seen once has nothing to isolate, yet with an ID it switches on its sinks, and they
learn from it what any document of its domain would teach; removal then takes that away. In a
fine-tune where most documents are seen once beside a few that repeat, the sinks spend themselves
on the once-seen ones: the general path learns less of the domain and the repeated documents'
memorization has fewer sinks to go to. Here a training forward gives each sighting among the first
``K - 1`` of its ID (and of its content, as ``sightings_by`` says) the ID -1, so those rows train
the general path with no sink on, as rows without an ID do; every later sighting trains the general
path and its own sinks together, the paper's method. Unlike ``general_sightings``, no sighting is
kept off the general path, so the forward stays one call and nothing is held in the optimizer.

The counts are the ones ``general_sightings`` keeps (:class:`hf_memsinks.sightings.counts.Sightings`:
exact, the same in every process, saved with the optimizer's state by :mod:`.saved_counts`).
"""

from __future__ import annotations

import torch

from .routing import first_sightings, routing_of


@torch.compiler.disable
def later_sighting_ids(patch, ids: torch.Tensor, inputs: torch.Tensor | None,
                       attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``ids`` of one training forward with -1 on every sighting among the first
    ``sinks_from_sighting - 1`` of its ID; counts the step's sightings (every process's). Eager under
    ``torch.compile``: the counts are a table that grows. ``inputs``: the forward's token IDs (its
    embeddings, or None: counted by ID alone)."""
    tokens = inputs if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() else None
    early = first_sightings(routing_of(patch, ids.device), ids, patch.config.sinks_from_sighting - 1, tokens,
                            attention_mask)
    return torch.where(early, torch.full_like(ids, -1), ids)
