"""The gradient of the sink neurons a step touched, and of no other.

A document activates 5% of the sinks in the fine-tuning recipe, so a batch of a few documents
touches a few tenths of them at most, and a gathered projection (:mod:`.active_sinks`) computes
the gradient of those rows only. Handed to autograd it becomes a gradient as large as every sink:
zeroed, added into, summed over micro-batches, then read whole by the optimizer's rule. In a full
fine-tune with ``sink_optimizer="rowwise"`` those full-size gradients (4 bytes for each sink weight
in fp32) are the largest thing the sinks add beside themselves.

Here a sink parameter the rowwise rule steps keeps, instead, the rows its gathered projections
computed: ``(row index, row gradient)`` pairs (:class:`TouchedRows`), summed over micro-batches
and taken by the rule at the optimizer's step
(:class:`~hf_memsinks.integrations.rowwise_sinks.RowwiseSinks`), which moves only those rows, as
it moves only the rows whose gradient is not zero. The parameter's ``.grad`` stays None, so these
gradients are not part of gradient clipping (the rule divides each neuron's gradient by its own
running RMS, whatever its scale).

The rows are kept only where the same step's gradients show when a new step begins: the
projection's general weight trains (a full fine-tune), its ``.grad`` None when a training call
starts means the optimizer's ``zero_grad`` ran, and rows kept from before (a step the optimizer
skipped) are dropped then. Elsewhere the dense gradient is used, as before:

* under a process group (DDP reduces ``.grad``),
* under fp16 autocast (a loss scaler unscales and checks ``.grad``),
* with the general neurons frozen (an adapter's fine-tune),
* on the dense path (a projection that does not gather, or a call without IDs); the rule adds
  the rows kept into that gradient then.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class TouchedRows:
    """One sink parameter's kept gradient rows (one neuron per row, whatever the parameter's layout),
    summed when the step comes; the pairs are merged once they hold more rows than the parameter has,
    so they never take more memory than its dense gradient."""

    def __init__(self, rows: int, anchor: nn.Parameter, dtype: torch.dtype):
        self.rows, self.anchor, self.dtype = rows, anchor, dtype
        self.index: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.kept = 0

    def add(self, index: torch.Tensor, grads: torch.Tensor) -> None:
        """Rows ``index`` (1-D) take ``grads`` (one row each; cast to the parameter's dtype, as autocast's
        gradient would be)."""
        self.index.append(index)
        self.grads.append(grads.to(self.dtype))
        self.kept += index.numel()
        if self.kept > self.rows and len(self.index) > 1:
            index, grads = self.take()
            self.index, self.grads, self.kept = [index], [grads], index.numel()

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, their gradient)``, each row once, and forget them; None when none were kept."""
        if not self.index:
            return None
        index, grads = torch.cat(self.index), torch.cat(self.grads)
        self.clear()
        rows, inverse = torch.unique(index, return_inverse=True)
        summed = grads.new_zeros(rows.numel(), grads.shape[1]).index_add_(0, inverse, grads)
        return rows, summed

    def clear(self) -> None:
        self.index, self.grads, self.kept = [], [], 0


# id(parameter) -> (a weak reference to it, its rows); the entry goes with the parameter
_KEPT: dict[int, tuple[weakref.ref, TouchedRows]] = {}


def keep_touched_rows(part: nn.Parameter, rows: int, anchor: nn.Parameter) -> None:
    """From now on keep ``part``'s gathered gradient rows (``rows`` neurons) instead of a dense
    gradient, wherever :func:`for_call` allows; ``anchor`` is the general weight beside it."""
    key = id(part)
    _KEPT[key] = (weakref.ref(part, lambda _: _KEPT.pop(key, None)), TouchedRows(rows, anchor, part.dtype))


def stop_keeping(part: nn.Parameter) -> None:
    """``part``'s gradient is dense again (what a later optimizer without the rowwise rule reads)."""
    _KEPT.pop(id(part), None)


def kept(part: torch.Tensor | None) -> TouchedRows | None:
    """``part``'s :class:`TouchedRows`, if it keeps its rows."""
    entry = _KEPT.get(id(part))
    return entry[1] if entry is not None and entry[0]() is part else None


def for_call(part: torch.Tensor | None) -> TouchedRows | None:
    """Where a gathered projection's training call puts ``part``'s gradient rows: its
    :class:`TouchedRows`, or None for the dense gradient (see the module's docstring)."""
    touched = kept(part)
    if touched is None or not (part.requires_grad and touched.anchor.requires_grad and torch.is_grad_enabled()):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    device = part.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return None
    if touched.anchor.grad is None:  # (a new step: rows kept before it belong to a step never taken)
        touched.clear()
    return touched
