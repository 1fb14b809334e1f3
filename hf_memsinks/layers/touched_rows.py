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
* where a hook on the parameter (``register_hook``) takes its gradient as autograd makes it,
* on the dense path (a projection that does not gather); a dense gradient made beside the rows
  takes them in.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .ddp_graph import process_group_running
from .neurons import neuron_rows

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
        held = "dense" if self.full is not None else f"rows={sum(i.numel() for i in self.row_index)}"
        return f"TouchedRowsGrad(shape={tuple(self.shape)}, {held})"

    def add_rows(self, index: torch.Tensor, grads: torch.Tensor) -> None:
        """Rows ``index`` (1-D) take ``grads`` (one row each, cast to the gradient's dtype)."""
        grads = grads.to(self.dtype)
        if self.full is not None:
            neuron_rows(self.full, self.neuron_dim).index_add_(0, index, grads)
            return
        self.row_index.append(index)
        self.row_grads.append(grads)
        self.merged = False
        if sum(i.numel() for i in self.row_index) > self.neurons:
            self.rows()  # (merged: at most one row per neuron)

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
                neuron_rows(self.full, self.neuron_dim).index_add_(0, *rows)
            self.row_index, self.row_grads, self.merged = [], [], True
        return self.full

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

    def _clear(self) -> None:
        self.row_index, self.row_grads, self.merged = [], [], True
        if self.full is not None:
            self.full.zero_()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # on the rows: a norm of order >= 0 (the untouched rows are zero), a scale by one number, a zero;
        # everything else reads the dense gradient
        if not kwargs and func in _ROW_OPS:
            many = isinstance(args[0], (list, tuple))
            tensors, rest = (args[0] if many else [args[0]]), args[1:]
            if func in _NORMS and len(rest) <= 1 and _order(rest) >= 0:
                norms = [t._rows_norm(*rest) if isinstance(t, TouchedRowsGrad) else torch.linalg.vector_norm(t, *rest)
                         for t in tensors]
                return norms if many else norms[0]
            if func in _SCALES and _one_number(rest[0]):
                for t in tensors:
                    if isinstance(t, TouchedRowsGrad):
                        t._rows_scale(rest[0])
                    else:
                        t.mul_(rest[0])
                return None if many else args[0]
            if func in _ZEROS:
                for t in tensors:
                    if isinstance(t, TouchedRowsGrad):
                        t._clear()
                    else:
                        t.zero_()
                return None if many else args[0]

        def unwrap(t):
            return t.dense() if isinstance(t, TouchedRowsGrad) else t

        out = func(*[[unwrap(t) for t in a] if isinstance(a, (list, tuple)) else unwrap(a) for a in args],
                   **{k: unwrap(v) for k, v in kwargs.items()})
        if func._schema.name.endswith("_") and isinstance(args[0], TouchedRowsGrad):
            return args[0]  # (in place: it changed the dense gradient this one now holds)
        return out


_NORMS = (aten.linalg_vector_norm.default, aten._foreach_norm.Scalar)
_SCALES = (aten.mul_.Tensor, aten.mul_.Scalar, aten._foreach_mul_.Tensor, aten._foreach_mul_.Scalar)
_ZEROS = (aten.zero_.default, aten._foreach_zero_.default)
_ROW_OPS = _NORMS + _SCALES + _ZEROS


def _order(rest: tuple) -> float:
    return 2.0 if not rest else float(rest[0])


def _one_number(factor) -> bool:
    """A factor that scales every value alike (clipping's): a number, or a tensor of one value."""
    return isinstance(factor, (int, float)) or (
        isinstance(factor, torch.Tensor) and not isinstance(factor, TouchedRowsGrad) and factor.numel() == 1)


class RowTarget:
    """Where one training call's backward puts a sink parameter's gradient rows. It holds the node
    of autograd that accumulates into the parameter's ``.grad``, the one this call's graph uses."""

    def __init__(self, part: nn.Parameter, dim: int):
        self.part, self.dim = part, dim
        self.node = torch.autograd.graph.get_gradient_edge(part).node

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
            neuron_rows(grad, self.dim).index_add_(0, index, grads.to(grad.dtype))


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
    if not keeps_rows(part) or not (part.requires_grad and torch.is_grad_enabled()) or part._backward_hooks:
        return None  # (a hook on the parameter takes its gradient as autograd makes it: dense)
    if process_group_running():
        return None
    device = part.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return None
    return RowTarget(part, _KEPT[id(part)][1])
