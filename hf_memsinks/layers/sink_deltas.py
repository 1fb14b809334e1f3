"""Sinks that train beside a frozen weight: what :func:`hf_memsinks.train_sinks` gives a patched
projection under an adapter.

Under LoRA the base weights are frozen. Making a patched weight trainable to train its sink rows
would give the whole MLP weight a gradient and optimizer state (general neurons included, their
gradient zeroed afterwards): the memory of a full fine-tune of every MLP. Instead the projection
gets ``sink_delta_weight`` (and ``sink_delta_bias``), a parameter the size of its sink part only,
added to the frozen weight's sink part in the forward (one extra matmul at the sinks' width). The
gradient, the optimizer's state and the sink-LR hook then cover the sink neurons alone, and the
general neurons cannot move, weight decay included.

The sinks' value is the weight's sink part plus the delta: every read of the weights (state dict,
``sink_parameters``, statistics) goes through :func:`effective`; removal and forgetting fold the
delta into the weight first (:func:`fold_deltas`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .neurons import pick

PREFIX = "sink_delta_"
# grad_fn types of a matmul's output (seen through its reshape): backward keeps their inputs only,
# so adding into the output in place cannot corrupt a saved tensor
_FRESH_MATMUL = frozenset({"AddmmBackward0", "MmBackward0", "ViewBackward0", "UnsafeViewBackward0", "AddBackward0"})


def deltas(module: nn.Module) -> dict[str, nn.Parameter]:
    """``{"weight": parameter, "bias": ...}``: the module's sink deltas (empty without)."""
    return {name: getattr(module, PREFIX + name) for name in module.neuron_dims()
            if isinstance(getattr(module, PREFIX + name, None), nn.Parameter)}


def add_deltas(module: nn.Module) -> list[str]:
    """Freeze the module's neuron-indexed tensors and give each a zero delta over its sink part;
    returns the new parameters' names (none when the module has its deltas already)."""
    if deltas(module):
        return []
    added = []
    for name, dim in module.neuron_dims().items():
        param = getattr(module, name)
        param.requires_grad_(False)
        zeros = torch.zeros_like(pick(param.detach(), dim, module.memsink.sink_spans))
        module.register_parameter(PREFIX + name, nn.Parameter(zeros))
        added.append(PREFIX + name)
    module.memsink.deltas = True
    return added


def effective(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` of a patched projection as the sinks stand: its sink part plus its delta
    (a new tensor), or the parameter itself where it has no delta."""
    param = getattr(module, name)
    delta = deltas(module).get(name)
    if delta is None:
        return param
    dim, offset = module.neuron_dims()[name], 0
    value = param.detach().clone()
    for start, n in module.memsink.sink_spans:
        value.narrow(dim, start, n).add_(delta.detach().narrow(dim, offset, n))
        offset += n
    return value


@torch.no_grad()
def fold_deltas(module: nn.Module) -> None:
    """Add the deltas into the weights' sink parts and delete them (before removal or forgetting)."""
    for name, delta in deltas(module).items():
        getattr(module, name).data.copy_(effective(module, name))
        delattr(module, PREFIX + name)
    module.memsink.deltas = False


def input_delta(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An input projection's output ``out`` with its sink columns moved by the delta's output."""
    parts = deltas(module)
    weight = parts["weight"]
    if module.neuron_dims()["weight"] == 1:  # Conv1D stores (in, out)
        weight = weight.t()
    bias = parts.get("bias")
    extra = F.linear(x, weight, bias)
    spans = module.memsink.sink_spans
    if out.grad_fn is None or type(out.grad_fn).__name__ in _FRESH_MATMUL:
        offset = 0
        for start, n in spans:
            out.narrow(-1, start, n).add_(extra.narrow(-1, offset, n))
            offset += n
        return out
    index = torch.cat([torch.arange(start, start + n, device=out.device) for start, n in spans])
    return out.index_add(-1, index, extra)


def output_delta(module: nn.Module, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An output projection's ``out`` plus what its delta reads from the sink part of its input
    ``h`` (the sinks already applied to it)."""
    weight = deltas(module)["weight"]
    if module.neuron_dims()["weight"] == 0:  # Conv1D stores (in, out)
        weight = weight.t()
    m = module.memsink
    return out + F.linear(h.narrow(-1, m.general, m.sinks), weight)
