"""``general_sightings``' counts travel in the optimizer's state, so a resumed run continues them.

The counts are training state, like the optimizer's moments: a run resumed from a checkpoint that
counted afresh would train the general path on every document's next sighting once more. torch's
optimizer state dict keeps each entry of ``optimizer.state`` whose key is not a parameter as it is,
on save and on load, so the tables ride there under :data:`KEY`: written before every
``state_dict()`` (each ``Trainer`` checkpoint's ``optimizer.pt``, accelerate's ``save_state``), read
back after every ``load_state_dict()`` and when the hooks are attached (``Trainer`` loads a resumed
optimizer before its callbacks attach them). A model loaded into a new run, with a new optimizer,
counts afresh.
"""

from __future__ import annotations

import torch

from .counts import Sightings
from .routing import routing_of

KEY = "memsink_sightings"


def keep_counts_in(optimizer: torch.optim.Optimizer, patch) -> None:
    """Save ``patch``'s sighting counts with ``optimizer``'s state dict and restore them from it."""
    optimizer.register_state_dict_pre_hook(lambda opt: _write(opt, patch))
    optimizer.register_load_state_dict_post_hook(lambda opt: _read(opt, patch))
    _read(optimizer, patch)


def _write(optimizer: torch.optim.Optimizer, patch) -> None:
    routing = patch.routing
    if routing is None:
        optimizer.state.pop(KEY, None)
        return
    saved = {f"ids_{k}": v for k, v in routing.sightings.state_dict().items()}
    if routing.contents is not None:
        saved.update({f"contents_{k}": v for k, v in routing.contents.state_dict().items()})
    optimizer.state[KEY] = saved


def _read(optimizer: torch.optim.Optimizer, patch) -> None:
    saved = optimizer.state.get(KEY)
    if saved is None:
        return
    routing = routing_of(patch, saved["ids_ids"].device)
    _load(routing.sightings, saved, "ids_")
    if routing.contents is not None and "contents_ids" in saved:
        _load(routing.contents, saved, "contents_")


def _load(table: Sightings, saved: dict, prefix: str) -> None:
    table.load_state_dict({"ids": saved[prefix + "ids"], "counts": saved[prefix + "counts"]})
