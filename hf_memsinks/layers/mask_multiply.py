"""Multiplying the sink part of an activation by a bool mask, at the cost of the multiply only.

The mask of one forward call is ``(B, 1, S)`` or ``(B, T, S)`` bool, shared by every layer; it is
all that backward keeps. See :class:`MaskSinks` for when the multiply happens in place.
"""

from __future__ import annotations

import torch


class MaskSinks(torch.autograd.Function):
    """``h`` with its sink part multiplied by a bool mask. Saves only the (shared, compact) bool
    mask for backward, not a full-width float copy of it.

    Where it is safe, the mask is applied in place: no new activation-sized tensor, which on CPU
    means no fresh pages to fault in (a full copy per layer measured ~4% of a training step).
    Safe = ``h`` is not a view and the op that made it does not keep its *output* for backward:
    products (SwiGLU, tanh-GELU) and GELU/SiLU keep their inputs. Anything else (ReLU keeps its
    output) gets a masked copy. The incoming gradient is masked in place: it is the fresh output
    of the projection's matmul backward and has no other reader.

    ``factor`` (None: ``keep`` itself) is the same mask in ``h``'s dtype (one per forward call, shared by the layers):
    multiplying by a bool tensor converts it at every element, about 10x the cost of the multiply
    for a per-token ``(B, T, S)`` mask on CPU. Backward keeps only the bool mask; ``shared`` (a
    :class:`BackwardFactors` of the call, or None) converts it once for every layer's backward and
    frees the copy when the layer that masked first is done, so nothing is held between forward
    and backward.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, keep: torch.Tensor, factor: torch.Tensor | None, num_general: int,
                in_place: bool, shared: BackwardFactors | None = None) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.num_general = num_general
        ctx.shared, ctx.order = shared, shared.register() if shared is not None else 0
        factor = keep if factor is None else factor
        if in_place:
            h.narrow(-1, num_general, h.shape[-1] - num_general).mul_(factor)
            ctx.mark_dirty(h)
            return h
        return _masked_copy(h, factor, num_general)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        g = ctx.num_general
        if grad.is_contiguous() and not torch.compiler.is_compiling():  # (a view of the matmul's fresh result is fine)
            factor = keep.to(grad.dtype) if ctx.shared is None else ctx.shared.get(keep, grad.dtype)
            grad.narrow(-1, g, grad.shape[-1] - g).mul_(factor)
            if ctx.shared is not None and ctx.order == 0:
                ctx.shared.clear()  # (the first layer to mask is the last to run backward)
            return grad, None, None, None, None, None
        return _masked_copy(grad, keep, g), None, None, None, None, None


class BackwardFactors:
    """The bool mask of one forward call in the gradient's dtype, made by the first layer's
    backward that needs it and reused by the others (one conversion per call, not per layer).
    Holds no tensor until backward starts; :meth:`clear` drops it."""

    __slots__ = ("count", "factors")

    def __init__(self):
        self.count, self.factors = 0, {}

    def register(self) -> int:
        """The order in which a layer's forward used these masks (0: the first)."""
        self.count += 1
        return self.count - 1

    def get(self, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        factor = self.factors.get(dtype)
        if factor is None:
            factor = self.factors[dtype] = keep.to(dtype)
        return factor

    def clear(self) -> None:
        self.factors.clear()


# grad_fn types whose backward keeps their inputs, never their output: masking their output in
# place cannot corrupt a saved tensor (autograd's version counter would catch it anyway).
_KEEPS_INPUTS_ONLY = frozenset({"MulBackward0", "GeluBackward0", "SiluBackward0"})


def maskable_in_place(h: torch.Tensor) -> bool:
    if h._base is not None or not h.is_contiguous():
        return False
    # Without a graph (inference) we cannot tell a fresh activation from a caller's tensor: copy.
    # Under torch.compile, keep the graph functional (inductor fuses the copy away).
    if torch.compiler.is_compiling():
        return False
    return h.grad_fn is not None and type(h.grad_fn).__name__ in _KEEPS_INPUTS_ONLY


def _masked_copy(x: torch.Tensor, keep: torch.Tensor, num_general: int) -> torch.Tensor:
    out = x.clone()
    out[..., num_general:].mul_(keep)
    return out


def general_only(h: torch.Tensor, general: int, sinks: int, scale: float) -> torch.Tensor:
    """Full width again with the sinks at zero and the general part times ``scale``."""
    part = h[..., :general]
    part = part * scale if scale != 1.0 else part
    return torch.cat([part, part.new_zeros(*part.shape[:-1], sinks)], dim=-1)
