"""Sinks stored apart from the general neurons: what :func:`hf_memsinks.train_sinks` gives a patched
projection under an adapter, and what ``MemSinkConfig(sink_optimizer="rowwise")`` gives every one.

Under LoRA the base weights are frozen. Making a patched weight trainable to train its sink rows
would give the whole MLP weight a gradient and optimizer state (general neurons included, their
gradient zeroed afterwards): the memory of a full fine-tune of every MLP. Instead the sinks move
out of the projection's tensors: ``weight`` (and ``bias``) keep the general neurons only, still the
same parameter objects, and ``sink_part_weight`` (and ``sink_part_bias``) hold the sinks, a
parameter of their own. The gradient, the optimizer's state and the sink-LR hook then cover the
sink neurons alone, the general neurons cannot move (weight decay included), and no frozen copy of
the sinks is kept beside them.

In a full fine-tune with ``sink_optimizer="rowwise"`` the general neurons stay trainable, and the
sinks, a parameter of their own, can be stepped by a rule of their own while the optimizer keeps
its moments for the general neurons only (:mod:`hf_memsinks.integrations.rowwise_sinks`).

The projection's width does not change (``in_features`` / ``out_features``, and for a Conv1D the
``ds_shape`` of its weight, which PEFT reads there: what an adapter around it sees): its forward
computes the two parts and lays them out as the joined tensor would (:func:`dense_input`,
:func:`dense_output`). Every read of the whole tensor (state dict,
``sink_parameters``, statistics) goes through :func:`whole`; removal, forgetting and an adapter's
merge join the parts first (:func:`join`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..transformers_internals import Conv1D
from .ddp_graph import zero_of
from .neurons import interleave

PREFIX = "sink_part_"


def parts(module: nn.Module) -> dict[str, nn.Parameter]:
    """``{"weight": parameter, "bias": ...}``: the module's sinks stored apart (empty when joined)."""
    return {name: getattr(module, PREFIX + name) for name in module.neuron_dims()
            if isinstance(getattr(module, PREFIX + name, None), nn.Parameter)}


@torch.no_grad()
def set_apart(module: nn.Module, reuse: dict[str, nn.Parameter] | None = None,
              freeze_general: bool = True) -> list[str]:
    """Move the module's sinks into parameters of their own (trainable) and, with ``freeze_general``,
    freeze what is left, its general neurons; returns the sinks' parameter names. Where they are
    apart already, only makes them trainable (and freezes the general neurons). The general tensors
    stay the same parameter objects (an optimizer holding them keeps them), and so do the sinks'
    where ``reuse`` gives the ones :func:`join` took away."""
    if parts(module):
        for name, part in parts(module).items():
            part.requires_grad_(True)
            if freeze_general:
                getattr(module, name).requires_grad_(False)
        return [PREFIX + name for name in parts(module)]
    added = []
    for name, dim in module.neuron_dims().items():
        param = getattr(module, name)
        general, sinks = module.split(param.detach(), dim)
        param.data = general.contiguous()
        if freeze_general:
            param.requires_grad_(False)
        part = (reuse or {}).get(name)
        if part is None:
            part = nn.Parameter(sinks.contiguous())
        else:
            part.data = sinks.contiguous()
            part.requires_grad_(True)
        module.register_parameter(PREFIX + name, part)
        added.append(PREFIX + name)
    module.memsink.apart = True
    mark_width(module)
    return added


def mark_width(module: nn.Module) -> None:
    """A Conv1D whose sinks are apart: its weight's ``ds_shape`` is the whole weight's shape, which is
    what PEFT reads a Conv1D's width from when it is there (else from the weight's own shape). A
    parameter's attributes do not survive ``copy.deepcopy``: the projection sets it again then."""
    if isinstance(module, Conv1D) and module.memsink.apart:
        weight, part = module.weight, parts(module)["weight"]
        dim = module.neuron_dims()["weight"]
        shape = list(weight.shape)
        shape[dim] += part.shape[dim]
        weight.ds_shape = torch.Size(shape)


def whole(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` of a patched projection with every neuron, general and sinks laid out as
    patching lays them out: the parameter itself where the sinks are not apart, else a new tensor."""
    param = getattr(module, name)
    part = parts(module).get(name)
    if part is None:
        return param
    return interleave(param.detach(), part.detach(), module.neuron_dims()[name], module.memsink.neuron_chunks)


@torch.no_grad()
def join(module: nn.Module) -> dict[str, nn.Parameter]:
    """Put the sinks back into the general neurons' tensors (before removal, forgetting or a merge);
    returns the parameters that held them."""
    taken = parts(module)
    for name in taken:
        param = getattr(module, name)
        param.data = whole(module, name)
        param.__dict__.pop("ds_shape", None)
        delattr(module, PREFIX + name)
    module.memsink.apart = False
    return taken


def connected(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``out`` of a training call that skips the sinks, with the trainable sink parameters in its
    graph (times 0) while a process group runs, as the whole weight would be
    (:func:`~.ddp_graph.zero_of`)."""
    if not (module.training and torch.is_grad_enabled()):
        return out
    zero = zero_of(parts(module).values())
    return out if zero is None else out + zero


def _linear(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight (or weight part) as ``F.linear`` takes it (Conv1D stores ``(in, out)``)."""
    transposed = module.neuron_dims()["weight"] == (1 if module.memsink.role == "in" else 0)
    return tensor.t() if transposed else tensor


def dense_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An input projection's output with every neuron: per chunk its general neurons, then its sinks."""
    sinks = parts(module)
    general = F.linear(x, _linear(module, module.weight), module.bias)
    own = F.linear(x, _linear(module, sinks["weight"]), sinks.get("bias"))
    return interleave(general, own, -1, module.memsink.neuron_chunks)


def dense_output(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The output projection of ``h``, every neuron wide (the sinks already applied to it)."""
    g = module.memsink.general
    out = F.linear(h.narrow(-1, 0, g), _linear(module, module.weight), module.bias)
    return out + F.linear(h.narrow(-1, g, h.shape[-1] - g), _linear(module, parts(module)["weight"]))
