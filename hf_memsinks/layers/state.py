"""What the sinks do in one forward call, bound to that call.

Two lifetimes, two objects:

* :class:`SinkState`, one per patched model: the config, the eval mode chosen with
  ``set_sink_mode``, and the output projections whose masks a forward needs.
* :class:`ForwardSinks`, one per forward call: the call's kind (masked by its IDs, general only,
  dropped, constant coefficients), its IDs and the masks built from them. It is created when a
  forward of the model or of its backbone starts, lives in a thread-local slot of the model's
  ``SinkState`` while that forward runs, and is gone when it returns (also on error).

So a projection sees the masks of the forward it is part of, and only those: a backbone called
directly (TRL's fused LM head, Liger kernels, reward heads) with its own ``sequence_ids`` gets its
own; called without any it raises in training rather than reuse another call's masks; threads
running forwards of one model at once (``nn.DataParallel`` replicas) each see their own call.
Activation checkpointing replays a layer in backward, outside the call: the checkpoint function is
wrapped to re-enter the call that ran the layer (:mod:`hf_memsinks.model.gradient_checkpointing`).

A ``threading.local`` rather than a ``contextvars.ContextVar``: dynamo traces attribute reads of a
thread-local (so a compiled model reads its call's masks inside the graph) but not ``ContextVar.get``.
"""

from __future__ import annotations

import threading

import torch

from ..config import MemSinkConfig
from ..ids.masks import sink_mask
from .mask_multiply import BackwardFactors

EVAL_MODES = ("drop", "expected", "activate", "exclude")
PAPER_MODE_NAMES = {"dropout": "drop", "all": "expected", "activate_seq": "activate", "exclude_seq_ids": "exclude"}

NEEDS_IDS = (
    "this memsink model is in training mode and needs sequence_ids: pass model(..., sequence_ids=ids) "
    "(or to its backbone, model.base_model(..., sequence_ids=ids)) with ids of shape (batch,) or "
    "(batch, seq_len), one ID per document (hf_memsinks.data adds them to a dataset). To train general "
    "neurons only on unlabeled data, use MemSinkConfig(require_sequence_ids=False) or ID -1."
)


class ForwardSinks:
    """The sinks of one forward call.

    ``kind``: ``"mask"`` (sinks follow ``ids``: training, or eval mode ``"activate"``),
    ``"general"`` (training without IDs: sinks off, general x1), ``"drop"`` (eval default: sinks
    off, general x eval scale) or ``"coef"`` (each sink times a constant: ``"expected"``,
    ``"exclude"``). Masks are keyed by (layer key, number of sinks); coefficients are cached lazily;
    ``rows`` holds, per MoE experts module, which token each of its expert rows belongs to.
    """

    __slots__ = ("kind", "ids", "masks", "coefs", "rows")

    def __init__(self, kind: str, ids: torch.Tensor | None = None):
        self.kind = kind
        self.ids = ids
        self.masks: dict = {}
        self.coefs: dict = {}
        self.rows: dict = {}

    @property
    def skip_sinks(self) -> bool:
        return self.kind in ("general", "drop")


class ActiveSinks:
    """Per batch row, the sinks its IDs activate anywhere in it (:mod:`.active_sinks`): ``index``
    ``(B, k)``, ``k`` the most any row has, a shorter row padded with sinks inactive in it;
    ``keep`` the call's mask at those sinks, ``(B, 1, k)`` or ``(B, T, k)`` (False at padding)."""

    __slots__ = ("index", "keep")

    def __init__(self, keep: torch.Tensor):
        active = keep.any(1)
        count = int(active.sum(1).max()) if active.numel() else 0  # (a host sync, once per call and mask)
        # active first, each part in sink order; the padding is sinks inactive in the row
        if count == keep.shape[2]:  # every sink: in their own order, the dense layout (the width tells no other)
            self.index = torch.arange(count, device=keep.device).expand(keep.shape[0], -1).contiguous()
            self.keep = keep
            return
        order = torch.sort(active.to(torch.int8), dim=1, descending=True, stable=True).indices
        self.index = order[:, :count].contiguous()
        self.keep = keep.gather(2, self.index.unsqueeze(1).expand(-1, keep.shape[1], -1))


class SinkState:
    """One per patched model, shared by its projections (and by ``nn.DataParallel`` replicas)."""

    def __init__(self, config: MemSinkConfig):
        self.config = config
        self.eval_mode = "drop"
        self.eval_ids: torch.Tensor | None = None
        self.masked_sites: set[tuple[int, int]] = set()  # (layer, num_sinks) of every output projection
        self._local = threading.local()

    # A thread-local cannot be copied or pickled, and a copy must not share the original's calls.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # ---- the current call ---------------------------------------------------------------------

    def current(self) -> ForwardSinks | None:
        """The call running in this thread, or None outside any forward of the model."""
        return getattr(self._local, "call", None)

    def swap(self, call: ForwardSinks | None) -> ForwardSinks | None:
        """Make ``call`` current in this thread; return the one it replaces."""
        previous = getattr(self._local, "call", None)
        self._local.call = call
        return previous

    @torch.compiler.disable
    def enter(self, ids: torch.Tensor | None, training: bool) -> ForwardSinks | None:
        """Start a call: decide its kind, build every layer's mask now (under torch.compile this
        eager step is one graph break before the model, not one per MLP), make it current and
        return the call it replaces (give that to :meth:`leave`)."""
        return self.swap(self.new_call(ids, training))

    @torch.compiler.disable
    def leave(self, previous: ForwardSinks | None) -> None:
        self._local.call = previous

    def new_call(self, ids: torch.Tensor | None, training: bool) -> ForwardSinks:
        if training:
            if ids is None and self.config.require_sequence_ids:
                raise ValueError(NEEDS_IDS)
            call = ForwardSinks("mask" if ids is not None else "general", ids)
        elif self.eval_mode == "drop":
            call = ForwardSinks("drop")
        elif self.eval_mode == "activate":
            ids = self.eval_ids if self.eval_ids is not None else ids
            if ids is None:
                raise ValueError("sink mode 'activate' needs sequence IDs: pass sequence_ids= to forward/generate")
            call = ForwardSinks("mask", ids)
        else:
            call = ForwardSinks("coef")
        if call.kind == "mask":
            for layer, num_sinks in self.masked_sites:
                self.keep_mask(call, layer, num_sinks)
        return call

    def call_for_projection(self, training: bool) -> ForwardSinks:
        """The current call; outside any (a decoder layer run on its own) the eval modes that need
        no IDs still work, and training raises unless IDs are optional."""
        call = getattr(self._local, "call", None)
        if call is None:
            call = self.new_call(None, training)
        return call

    # ---- masks and coefficients ---------------------------------------------------------------

    def _layer_key(self, layer: int) -> int | None:
        return layer if self.config.per_layer_masks else None

    def _mask(self, ids: torch.Tensor, num_sinks: int, layer: int | None) -> torch.Tensor:
        c = self.config
        return sink_mask(ids, num_sinks, c.sink_active_prob, salt=c.salt, layer=layer, scheme=c.mask_scheme)

    @staticmethod
    def _cached(call: ForwardSinks, key: tuple, make):
        """``call.masks[key]``, made by ``make()`` the first time in this call."""
        value = call.masks.get(key)
        if value is None:
            value = call.masks[key] = make()
        return value

    def keep_mask(self, call: ForwardSinks, layer: int, num_sinks: int) -> torch.Tensor:
        """Bool ``(B, 1, S)`` or ``(B, T, S)``: which sinks the call's IDs activate."""
        key = self._layer_key(layer)

        def make():
            mask = self._mask(call.ids, num_sinks, key)
            return mask.unsqueeze(1) if call.ids.dim() == 1 else mask
        return self._cached(call, (key, num_sinks), make)

    def active_sinks(self, call: ForwardSinks, layer: int, num_sinks: int) -> ActiveSinks:
        """:meth:`keep_mask` as each row's active sinks (:class:`ActiveSinks`), cached for the call."""
        return self._cached(call, ("active", self._layer_key(layer), num_sinks),
                            lambda: ActiveSinks(self.keep_mask(call, layer, num_sinks)))

    def keep_factor(self, call: ForwardSinks, layer: int, num_sinks: int, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`keep_mask` in ``dtype``, for the multiply (a bool operand is converted at every
        element, in every layer); cached for the call, gone with it."""
        return self._cached(call, (self._layer_key(layer), num_sinks, dtype),
                            lambda: self.keep_mask(call, layer, num_sinks).to(dtype))

    def backward_factors(self, call: ForwardSinks, layer: int, num_sinks: int) -> BackwardFactors:
        """The call's shared :class:`BackwardFactors` for this layer's mask (layers sharing a mask
        share it); it outlives the call, held only by the layers' backward nodes."""
        return self._cached(call, ("backward", self._layer_key(layer), num_sinks), BackwardFactors)

    def general_scale(self, call: ForwardSinks) -> float:
        return self.config.general_eval_scale if call.kind == "drop" else 1.0

    def coefficients(self, call: ForwardSinks, layer: int, num_general: int, num_sinks: int,
                     like: torch.Tensor) -> torch.Tensor:
        """Full-width ``(G + S,)`` multipliers for the constant-coefficient eval modes."""
        key = (self._layer_key(layer), num_general, num_sinks, like.dtype, like.device)
        coef = call.coefs.get(key)
        if coef is None:
            sinks = torch.full((num_sinks,), self.config.sink_active_prob, device=like.device)
            if self.eval_mode == "exclude":
                excluded = self._mask(self.eval_ids.to(like.device), num_sinks, key[0]).reshape(-1, num_sinks)
                sinks = sinks * ~excluded.any(0)
            general = torch.ones(num_general, device=like.device)
            coef = call.coefs[key] = torch.cat([general, sinks]).to(like.dtype)
        return coef
