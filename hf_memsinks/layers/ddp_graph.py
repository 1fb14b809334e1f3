"""Every trainable parameter in each backward: what DDP (``find_unused_parameters=False``, its
default) needs, where a call leaves some parameters out of the graph (a batch that trains no general
neuron, a call that skips the sinks)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def process_group_running() -> bool:
    return dist.is_available() and dist.is_initialized()


def zero_of(params: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """0 times the sum of the trainable ``params``, to add to an output so that each gets a zero
    gradient, while a process group runs; else None (nothing to add)."""
    if not process_group_running():
        return None
    trainable = [p for p in params if p.requires_grad]
    return sum(p.sum() for p in trainable) * 0.0 if trainable else None
