"""The gradient of the sink neurons a step touched, and of no other.

A document activates 5% of the sinks in the fine-tuning recipe, so a batch of a few documents
touches a few tenths of them at most, and a gathered projection (:mod:`.active_sinks`) computes
the gradient of those rows only. Handed to autograd it becomes a gradient as large as every sink:
zeroed, added into, summed over micro-batches, then read whole by the optimizer's rule. Under
``sink_optimizer="rowwise"`` those full-size gradients (4 bytes for each sink weight in fp32) are
the largest thing the sinks add beside themselves.

Here the sink parameters the rowwise rule steps get, as ``.grad``, a :class:`TouchedRowsGrad`: a
tensor of the parameter's shape that stores only the rows the step's gathered projections
computed, summed over micro-batches. It is read as the dense gradient would be: gradient clipping
(``clip_grad_norm_``, accelerate's and ``Trainer``'s) takes its norm and scales it, ``zero_grad``
drops it, and any other operation sees the dense tensor (made then, once). The rule
(:class:`~hf_memsinks.integrations.rowwise_sinks.RowwiseSinks`) steps those rows only, as it
moves only the rows whose gradient is not zero.

The dense gradient is still made where something else reads it:

* under a process group (DDP reduces ``.grad`` as it is made),
* under fp16 autocast (a loss scaler unscales ``.grad``),
* in ``torch.autograd.grad`` and ``backward(inputs=...)`` without the parameter (the caller
  takes the gradient it returns, or none),
* on the dense path (a projection that does not gather); a dense gradient made beside the rows
  takes them in.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

aten = torch.ops.aten


class TouchedRowsGrad(torch.Tensor):
    """A sink parameter's gradient as its touched rows (one neuron per row, whatever the parameter's
    layout: ``neuron_dim`` is where its neurons are), summed; the rows added are merged once they
    are more than the parameter has, so it never takes more memory than the dense gradient."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, like: torch.Tensor, dim: int):
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                                   device=like.device)

    def __init__(self, like: torch.Tensor, dim: int):
        self.neuron_dim, self.neurons = dim, like.shape[dim]
        self.row_index: list[torch.Tensor] = []
        self.row_grads: list[torch.Tensor] = []
        self.merged = True  # (each row once in row_index)
        self.full: torch.Tensor | None = None  # (the dense gradient, once something else read it)

    def __repr__(self) -> str:
        return f"TouchedRowsGrad(shape={tuple(self.shape)}, rows={sum(i.numel() for i in self.row_index)})"

    def add_rows(self, index: torch.Tensor, grads: torch.Tensor) -> None:
        """Rows ``index`` (1-D) take ``grads`` (one row each, cast to the gradient's dtype)."""
        grads = grads.to(self.dtype)
        if self.full is not None:
            self._rows_of(self.full).index_add_(0, index, grads)
            return
        self.row_index.append(index)
        self.row_grads.append(grads)
        self.merged = False
        if sum(i.numel() for i in self.row_index) > self.neurons and len(self.row_index) > 1:
            self.rows()

    def rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, their gradient)``, each row once (None when none were added)."""
        if not self.row_index:
            return None
        if not self.merged:  # (a row that several documents touched adds up)
            index, inverse = torch.unique(torch.cat(self.row_index), return_inverse=True)
            grads = torch.cat(self.row_grads)
            summed = grads.new_zeros(index.numel(), grads.shape[1]).index_add_(0, inverse, grads)
            self.row_index, self.row_grads, self.merged = [index], [summed], True
        return self.row_index[0], self.row_grads[0]

    def dense(self) -> torch.Tensor:
        """The dense gradient, kept from now on (what every operation but a norm or a scale reads)."""
        if self.full is None:
            self.full = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            rows = self.rows()
            if rows is not None:
                self._rows_of(self.full).index_add_(0, *rows)
            self.row_index, self.row_grads, self.merged = [], [], True
        return self.full

    def _rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if self.neuron_dim == 1 else tensor

    def _rows_norm(self, *args) -> torch.Tensor:
        if self.full is not None:
            return torch.linalg.vector_norm(self.full, *args)
        rows = self.rows()
        if rows is None:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.linalg.vector_norm(rows[1], *args)

    def _rows_scale(self, factor) -> None:
        if self.full is not None:
            self.full.mul_(factor)
        elif self.row_index:
            self.rows()[1].mul_(factor)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ours = [isinstance(t, TouchedRowsGrad) for t in args[0]] if isinstance(args[0], (list, tuple)) else []
        if func is aten.detach.default:
            return args[0]
        if func is aten.linalg_vector_norm.default and len(args) <= 2 and not kwargs:
            return args[0]._rows_norm(*args[1:])  # (clip_grad_norm_ one tensor at a time)
        if func is aten._foreach_norm.Scalar and len(args) <= 2 and not kwargs:
            return [t._rows_norm(*args[1:]) if o else torch.linalg.vector_norm(t, *args[1:])
                    for t, o in zip(args[0], ours)]
        if func in (aten.mul_.Tensor, aten.mul_.Scalar) and not kwargs:
            args[0]._rows_scale(args[1])
            return args[0]
        if func in (aten._foreach_mul_.Tensor, aten._foreach_mul_.Scalar) and not kwargs:
            for t, o in zip(args[0], ours):
                t._rows_scale(args[1]) if o else t.mul_(args[1])
            return None
        if func is aten.zero_.default:
            args[0].row_index, args[0].row_grads, args[0].merged = [], [], True
            if args[0].full is not None:
                args[0].full.zero_()
            return args[0]

        def unwrap(t):
            return t.dense() if isinstance(t, TouchedRowsGrad) else t

        out = func(*[[unwrap(t) for t in a] if isinstance(a, (list, tuple)) else unwrap(a) for a in args],
                   **{k: unwrap(v) for k, v in kwargs.items()})
        if func._schema.name.endswith("_") and isinstance(args[0], TouchedRowsGrad):
            return args[0]  # (in place: it changed the dense gradient this one now holds)
        return out


class RowTarget:
    """Where one training call's backward puts a sink parameter's gradient rows. It holds the node
    of autograd that accumulates into the parameter's ``.grad``, the one this call's graph uses."""

    def __init__(self, part: nn.Parameter, dim: int):
        self.part, self.dim = part, dim
        with torch.enable_grad():
            self.node = part.view_as(part).grad_fn.next_functions[0][0]

    def accumulating(self) -> bool:
        """Whether the running backward accumulates into the parameter's ``.grad`` (``backward()``),
        rather than hand its gradient back (``torch.autograd.grad``) or skip it (``backward(inputs=...)``)."""
        try:
            return bool(torch._C._will_engine_execute_node(self.node))
        except RuntimeError:  # (torch.autograd.grad)
            return False

    def add(self, index: torch.Tensor, grads: torch.Tensor) -> None:
        """Rows ``index`` of the parameter's gradient take ``grads``: into its :class:`TouchedRowsGrad`
        (made at the step's first rows), or into a dense gradient already there."""
        grad = self.part.grad
        if grad is None:
            self.part.grad = grad = TouchedRowsGrad(self.part, self.dim)
        if isinstance(grad, TouchedRowsGrad):
            grad.add_rows(index, grads)
        else:
            (grad.t() if self.dim == 1 else grad).index_add_(0, index, grads.to(grad.dtype))


# id(parameter) -> (a weak reference to it, the dim of its neurons); the entry goes with the parameter
_KEPT: dict[int, tuple[weakref.ref, int]] = {}


def keep_touched_rows(part: nn.Parameter, dim: int) -> None:
    """From now on give ``part`` (its neurons along ``dim``) a :class:`TouchedRowsGrad` wherever
    :func:`for_call` allows."""
    key = id(part)
    _KEPT[key] = (weakref.ref(part, lambda _: _KEPT.pop(key, None)), dim)


def stop_keeping(part: nn.Parameter) -> None:
    """``part``'s gradient is dense again (what an optimizer without the rowwise rule reads)."""
    _KEPT.pop(id(part), None)


def keeps_rows(part: torch.Tensor | None) -> bool:
    entry = _KEPT.get(id(part))
    return entry is not None and entry[0]() is part


def for_call(part: torch.Tensor | None) -> RowTarget | None:
    """Where a gathered projection's training call puts ``part``'s gradient rows: a
    :class:`RowTarget`, or None for the dense gradient (see the module's docstring)."""
    if not keeps_rows(part) or not (part.requires_grad and torch.is_grad_enabled()):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    device = part.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return None
    return RowTarget(part, _KEPT[id(part)][1])
