"""Activation checkpointing: a layer replayed in backward runs inside the forward call that first
ran it.

Checkpointing replays a decoder layer during backward, after the model's forward has returned and
its call (:class:`hf_memsinks.layers.state.ForwardSinks`) is gone, maybe in another thread. So every
layer's checkpoint function is wrapped in :class:`ReplayInCall`: when checkpointing was enabled
before patching (:func:`wrap_checkpointing`, at patch time) and when it is enabled afterwards
(:class:`CheckpointingMixin`, on the patched model and backbone classes). Removal puts the
original functions back (:func:`unwrap_checkpointing`).
"""

from __future__ import annotations

from torch import nn

from ..layers.state import SinkState
from ..transformers_internals import CheckpointingHook, get_checkpoint_func, set_checkpoint_func


class ReplayInCall:
    """A checkpoint function whose replay of a layer runs inside the call that first ran the
    layer. A class, not a closure, so a model with checkpointing on still pickles."""

    def __init__(self, checkpoint_func, state: SinkState):
        self.original = checkpoint_func
        self.state = state

    def __call__(self, function, *args, **kwargs):
        state, call = self.state, self.state.current()

        def run(*a, **k):
            previous = state.swap(call)
            try:
                return function(*a, **k)
            finally:
                state.swap(previous)

        return self.original(run, *args, **kwargs)


def wrap_checkpointing(model: nn.Module, state: SinkState) -> None:
    """Wrap the checkpoint functions already set on ``model``'s layers."""
    for module in model.modules():
        func = get_checkpoint_func(module)
        if func is not None and not isinstance(func, ReplayInCall):
            set_checkpoint_func(module, ReplayInCall(func, state))


def unwrap_checkpointing(model: nn.Module) -> None:
    """Give every layer its original checkpoint function back."""
    for module in model.modules():
        func = get_checkpoint_func(module)
        if isinstance(func, ReplayInCall):
            set_checkpoint_func(module, func.original)


class CheckpointingMixin(CheckpointingHook):
    """For the patched classes: ``gradient_checkpointing_enable()`` after patching wraps too."""

    def wrap_checkpoint_func(self, func) -> ReplayInCall:
        return ReplayInCall(func, self.memsink.state)
