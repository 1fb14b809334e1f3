"""Where general and sink neurons sit along a tensor's neuron dimension, and the tensor ops on
that layout that patching, checkpoints and removal share.

A patched MLP keeps each neuron-indexed tensor whole: general neurons first, then sinks, per
chunk (a fused gate+up projection has two chunks, each ``G + S`` long); where the sinks are stored
apart (:mod:`.sink_parts`), that is the layout of the whole tensor its two parameters make. A span is ``(start,
length)`` along the neuron dimension. Each patched module records its layout, and how to undo
the patch, in one :class:`ProjectionPatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..transformers_internals import Conv1D
from .state import SinkState

Span = tuple[int, int]


# ---- what patching did to one projection ------------------------------------------------------------


@dataclass
class ProjectionPatch:
    """What patching did to one projection (or batched experts module), and how to undo it.

    Created by :func:`patch_projection` (or :func:`hf_memsinks.layers.experts.patch_experts`), kept as
    the module's one added attribute ``memsink``, consumed by removal (``fold``)."""

    role: str  # "in" (produces hidden neurons: up, gate, fused gate+up), "out" (reads them), "norm", "experts"
    general: int  # general neurons (per chunk)
    sinks: int  # sink neurons (per chunk)
    chunks: int  # chunks of the MLP's input projections: 2 for a fused gate+up, else 1
    layer: int  # decoder-layer index (for per-layer masks)
    external_width: int  # general width written to checkpoints: G, or G + S zero-padded
    state: SinkState  # the model's sink state: eval mode and the current forward call
    base_class: type  # the module's class before patching
    behind_norm: bool = False  # an output projection reading a norm over the hidden neurons (sinks applied there)
    apart: bool = False  # the sinks are parameters of their own (hf_memsinks.layers.sink_parts)
    # set by hf_memsinks.layers.adapters.sync_adapters:
    adapter: nn.Module | None = field(default=None, repr=False, compare=False)  # the adapter wrapping this module
    inputs_wrapped: bool = False  # an adapter wraps one of this MLP's input projections: all compute every neuron
    mlp_adapters: tuple = field(default=(), repr=False, compare=False)  # the adapters around this MLP's projections
    hooks: list = field(default_factory=list)  # handles of hooks added with the patch (the checkpoint format's)

    @property
    def wrapped(self) -> bool:
        """An adapter wrapper around this projection applies its sinks (hf_memsinks.layers.adapters)."""
        return self.adapter is not None

    @property
    def neuron_chunks(self) -> int:
        """Chunks along this projection's own neuron dimension (an output projection has one)."""
        return self.chunks if self.role == "in" else 1

    @property
    def general_spans(self) -> list[Span]:
        return chunk_spans(self.general + self.sinks, 0, self.general, self.neuron_chunks)

    @property
    def sink_spans(self) -> list[Span]:
        return chunk_spans(self.general + self.sinks, self.general, self.sinks, self.neuron_chunks)

    def remove_hooks(self) -> None:
        """Take the hooks in :attr:`hooks` off the module (when it is unpatched)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


def chunk_spans(width: int, first: int, count: int, chunks: int, rows: int = 1) -> list[Span]:
    """Neurons ``first .. first + count`` of each of ``chunks`` chunks of ``width`` neurons, with
    ``rows`` entries per neuron (2 for experts' stacked gate/up rows)."""
    return [(k * width * rows + first * rows, count * rows) for k in range(chunks)]


def pick(tensor: torch.Tensor, dim: int, spans: list[Span]) -> torch.Tensor:
    """The ``spans`` of ``tensor`` along ``dim``, in order, as one new tensor (never a view)."""
    return torch.cat([tensor.narrow(dim, a, n) for a, n in spans], dim)


def neuron_rows(tensor: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """``tensor`` with one neuron per row: a 2-D weight with its neurons along ``dim`` 1, transposed (a view)."""
    return tensor.t() if tensor is not None and dim == 1 else tensor


def interleave(first: torch.Tensor, second: torch.Tensor, dim: int, chunks: int) -> torch.Tensor:
    """Per chunk along ``dim``: ``first``'s part, then ``second``'s (sinks, new neurons or zero
    padding). The inverse of picking the two parts' spans."""
    blocks = []
    for a, b in zip(first.chunk(chunks, dim), second.chunk(chunks, dim)):
        blocks += [a, b]
    return torch.cat(blocks, dim)


def pad_chunks(tensor: torch.Tensor, dim: int, chunks: int, width: int, rows: int = 1) -> torch.Tensor:
    """Zero-pad every chunk of ``tensor`` along ``dim`` to ``width`` neurons."""
    own = tensor.shape[dim] // (chunks * rows)
    if own >= width:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = (width - own) * rows * chunks
    return interleave(tensor, tensor.new_zeros(shape), dim, chunks)


@torch.no_grad()
def copy_into_spans(param: torch.Tensor, dim: int, spans: list[Span], value: torch.Tensor) -> None:
    """Copy ``value``'s slices, in order, into the ``spans`` of ``param`` along ``dim``."""
    offset = 0
    for start, n in spans:
        param.narrow(dim, start, n).copy_(value.narrow(dim, offset, n))
        offset += n


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """A new parameter ``name`` holding ``value``, trainable as the old one was."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def neuron_dim(module: nn.Module, role: str) -> int:
    """Which weight dimension indexes hidden neurons: Conv1D stores weights (in, out); a norm
    over the hidden neurons has 1-D parameters."""
    if role == "norm":
        return 0
    transposed = isinstance(module, Conv1D)
    if role == "in":
        return 1 if transposed else 0
    return 0 if transposed else 1
