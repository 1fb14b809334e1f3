"""How often each sequence ID has been trained on: the count behind ``general_sightings``.

A *sighting* is one occurrence of a document in a training forward: a row with that ID, or, with
per-token IDs, one stretch of a packed row. :class:`Sightings` keeps an exact table (sorted IDs
and their counts, on the IDs' device, updated with vectorised ops: no per-ID Python loop) and
answers, for the sightings of one step, which are among the first ``limit`` of their ID. Within a
step, earlier rows come first; with several processes every process counts the IDs of all of them
(rank order), so every process holds the same table and takes the same decisions.
"""

from __future__ import annotations

import torch


class Sightings:
    """Counts of sightings per sequence ID (``ids`` sorted, ``counts`` aligned with them)."""

    def __init__(self, device: torch.device | str | None = None):
        self.ids = torch.empty(0, dtype=torch.long, device=device)
        self.counts = torch.empty(0, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return self.ids.numel()

    def count(self, ids: torch.Tensor) -> torch.Tensor:
        """Sightings so far of each of ``ids`` (0 for an ID never seen)."""
        ids = ids.to(self.ids.device)
        if not len(self):
            return torch.zeros_like(ids)
        pos = torch.searchsorted(self.ids, ids).clamp(max=len(self) - 1)
        return torch.where(self.ids[pos] == ids, self.counts[pos], 0)

    def add(self, ids: torch.Tensor) -> None:
        """Count one sighting of each entry of ``ids`` (1-D; an ID may appear several times)."""
        unique, times = torch.unique(ids.to(self.ids.device), return_counts=True)
        if not len(self):
            self.ids, self.counts = unique, times
            return
        pos = torch.searchsorted(self.ids, unique).clamp(max=len(self) - 1)
        known = self.ids[pos] == unique
        self.counts.index_add_(0, pos[known], times[known])
        new, new_times = unique[~known], times[~known]
        if new.numel():  # merge two sorted lists: each element moves right by the other's smaller ones
            size = len(self) + new.numel()
            old_at = torch.arange(len(self), device=new.device) + torch.searchsorted(new, self.ids)
            new_at = torch.arange(new.numel(), device=new.device) + torch.searchsorted(self.ids, new)
            ids_out, counts_out = new.new_empty(size), new_times.new_empty(size)
            ids_out[old_at], ids_out[new_at] = self.ids, new
            counts_out[old_at], counts_out[new_at] = self.counts, new_times
            self.ids, self.counts = ids_out, counts_out

    def first(self, ids: torch.Tensor, limit: int, everyone: torch.Tensor | None = None,
              offset: int = 0) -> torch.Tensor:
        """Whether each sighting of ``ids`` (1-D, in order) is among the first ``limit`` of its ID,
        counting earlier sightings of this step before it; then counts the step's sightings.

        ``everyone``: the step's sightings of every process in rank order (None: just ``ids``),
        ``ids`` being ``everyone[offset:offset + len(ids)]``; negative entries are padding."""
        return self.before(ids, everyone, offset) < limit

    def before(self, ids: torch.Tensor, everyone: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        """How many sightings of its ID came before each of ``ids`` (as :meth:`first`, which it
        serves); then counts the step's sightings."""
        step = ids if everyone is None else everyone
        step = step.to(self.ids.device)
        real = step >= 0
        same = (step.unsqueeze(0) == step.unsqueeze(1)) & real.unsqueeze(0)
        earlier = torch.tril(same, diagonal=-1).sum(1)  # this step's sightings of the ID before each
        seen = self.count(step) + earlier
        mine = seen[offset:offset + ids.numel()]
        self.add(step[real])
        return mine.to(ids.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        order = torch.argsort(state["ids"])
        self.ids = state["ids"][order].to(self.ids.device)
        self.counts = state["counts"][order].to(self.ids.device, torch.long)
