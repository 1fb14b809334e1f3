"""Sink-aware MLP projections, patched in place.

A patched projection is the *same* module object (its class is swapped for a subclass of its
own class), so parameter names, ``isinstance`` checks, optimizers and hooks keep working. Its
weight holds general and sink neurons together, general first (per chunk for a fused gate+up
projection), so training runs one matmul per projection, exactly as before patching:

* input projections (up/gate) compute every neuron in training; when sinks are off they compute
  the general rows only, so evaluation costs what the sink-free model costs;
* the output projection multiplies the sink part of its input by the mask of the current
  sequence IDs (a bool tensor of ``(B, 1, S)`` or ``(B, T, S)``, shared by all layers and the
  only thing kept for backward) before its matmul;
* where a norm over the hidden neurons sits between them (BitNet's ``ffn_sub_norm``), the norm
  applies the mask at its input instead, so an inactive sink is exactly zero in the norm's
  statistics and gets no gradient through them; the output projection then reads sinks that are
  already masked (and only scales the general part when sinks are off, as without a norm).

Patching adds one attribute, ``module.memsink`` (a :class:`ProjectionPatch`: what was patched and
how to undo it), and swaps the class; :func:`unpatch_projection` takes both away again.

This module only computes. In a checkpoint the general and sink parts are separate tensors
(``weight``, ``sink_weight``, ...): that format, state-dict hooks included, is
:mod:`hf_memsinks.checkpoints.sink_tensors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..transformers_internals import NoHubKernel, drop_hub_kernel
from . import sink_parts
from .active_sinks import active_sinks_for, gathered_input, gathered_output
from .mask_multiply import MaskSinks, general_only, maskable_in_place
from .neurons import ProjectionPatch, interleave, neuron_dim, pad_chunks, pick, replace_parameter
from .state import ForwardSinks, SinkState

# ---- the projection subclasses ---------------------------------------------------------------------


class SinkProjection(NoHubKernel):
    """Mixed into a copy of the projection's own class; its state is ``self.memsink``."""

    memsink: ProjectionPatch

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.t() if neuron_dim(self, "in") == 1 else self.weight

    def neuron_dims(self) -> dict[str, int]:
        """``{parameter name: its neuron dimension}`` for every tensor indexed by hidden neurons."""
        dims = {"weight": neuron_dim(self, self.memsink.role)}
        if self.memsink.role in ("in", "norm") and getattr(self, "bias", None) is not None:
            dims["bias"] = 0
        return dims

    def split(self, tensor: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``tensor``'s general and sink parts along ``dim`` (new tensors)."""
        return pick(tensor, dim, self.memsink.general_spans), pick(tensor, dim, self.memsink.sink_spans)

    def general_and_sink_parts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"weight": (general, sinks), "bias": (...)}`` as new tensors (for tests and export); where
        the sinks are stored apart (:mod:`hf_memsinks.layers.sink_parts`), copies of the two parameters."""
        apart = sink_parts.parts(self)
        return {name: (getattr(self, name).detach().clone(), apart[name].detach().clone()) if name in apart
                else self.split(getattr(self, name), dim) for name, dim in self.neuron_dims().items()}

    # -- patch-time growth and removal --

    def grow(self, generator: torch.Generator, random_init: bool) -> None:
        """Append the sinks to tensors that hold only the general neurons: input rows random like
        the existing ones, biases and output columns zero, so the model's outputs do not change."""
        m = self.memsink
        for name, dim in self.neuron_dims().items():
            tensor = getattr(self, name).data
            shape = list(tensor.shape)
            shape[dim] = m.sinks
            random = random_init and m.role == "in" and name == "weight" and tensor.numel() > 1
            std = float(tensor.float().std()) if random else 0.0
            new = [torch.randn(shape, generator=generator) * std if std > 0 else torch.zeros(shape)
                   for _ in range(m.neuron_chunks)]
            new = torch.cat(new, dim).to(device=tensor.device, dtype=tensor.dtype)
            replace_parameter(self, name, interleave(tensor, new, dim, m.neuron_chunks))

    def fold(self, general_scale: float, sink_coef: torch.Tensor | None, width: int) -> None:
        """Plain weights again, then the module's own class back (:func:`unpatch_projection`).

        Args:
            general_scale: multiplies the general neurons' output columns.
            sink_coef: None to delete the sinks; else ``(S,)`` multipliers of the sinks' output
                columns, which are kept.
            width: neurons per chunk of the result (zero-padded up to it).
        """
        m = self.memsink
        sink_parts.join(self)
        for name, dim in self.neuron_dims().items():
            general, sinks = self.split(getattr(self, name), dim)
            if m.role == "out":
                general = general * general_scale if general_scale != 1.0 else general
                if sink_coef is not None:
                    shape = [1] * sinks.dim()
                    shape[dim] = m.sinks
                    sinks = sinks * sink_coef.to(sinks).reshape(shape)
            value = general if sink_coef is None else interleave(general, sinks, dim, m.neuron_chunks)
            replace_parameter(self, name, pad_chunks(value, dim, m.neuron_chunks, width))
        unpatch_projection(self)

    # -- the sink parts under their checkpoint names (the format: hf_memsinks.checkpoints.sink_tensors) --

    @property
    def sink_weight(self) -> torch.Tensor:
        """The sink part of the weight (a copy), named as in checkpoints; lets tools that map
        state-dict keys back to attributes (torch.distributed.checkpoint) resolve ``sink_weight``."""
        return self.general_and_sink_parts()["weight"][1]

    @property
    def sink_bias(self) -> torch.Tensor | None:
        parts = self.general_and_sink_parts()
        return parts["bias"][1] if "bias" in parts else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, general={self.memsink.general}, sinks={self.memsink.sinks}"

    def __reduce_ex__(self, protocol):
        """Pickle by the original class and role: the subclass is made at patch time. The state is
        ``__dict__``, hook tables (the checkpoint format's hooks) included."""
        return _new_patched_projection, (self.memsink.base_class, self.memsink.role), self.__dict__

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        sink_parts.mark_width(self)  # (deep copies and pickles: see sink_parts.mark_width)


class SinkInProjection(SinkProjection):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.memsink
        call = m.state.call_for_projection(self.training)
        if not call.skip_sinks or m.inputs_wrapped:
            if not m.wrapped and (active := active_sinks_for(self, call, x)) is not None:  # (a wrapper gathers itself)
                return gathered_input(self, x, active)
            if m.apart:
                return sink_parts.dense_input(self, x)
            return super().forward(x)  # every neuron: exactly the plain module's computation
        weight, bias = self._linear_weight(), self.bias
        if m.apart:  # (the weight holds the general neurons only)
            return sink_parts.connected(self, F.linear(x, weight, bias))
        outs = [F.linear(x, weight[a : a + n], None if bias is None else bias[a : a + n]) for a, n in m.general_spans]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class SinkOutProjection(SinkProjection):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.memsink
        call = m.state.call_for_projection(self.training)
        if m.wrapped:  # the adapter wrapper's pre-hook already applied the sinks (hf_memsinks.layers.adapters)
            return sink_parts.dense_output(self, h) if m.apart else super().forward(h)
        if call.skip_sinks:
            h = h[..., : m.general] if h.shape[-1] != m.general else h
            scale = m.state.general_scale(call)
            h = h * scale if scale != 1.0 else h
            if m.apart:  # (the weight holds the general neurons only)
                return sink_parts.connected(self, F.linear(h, self._linear_weight(), self.bias))
            return F.linear(h, self._linear_weight()[:, : m.general], self.bias)
        if (active := active_sinks_for(self, call, h)) is not None:
            return gathered_output(self, h, active)
        h = self.sink_input(h, call)
        return sink_parts.dense_output(self, h) if m.apart else super().forward(h)

    def sink_input(self, h: torch.Tensor, call: ForwardSinks | None = None) -> torch.Tensor:
        """The full-width input the current call's sinks allow: sink part masked (training,
        activate) or weighted (expected, exclude); with sinks off, zero sinks and scaled general part."""
        m = self.memsink
        state, g = m.state, m.general
        if call is None:
            call = state.call_for_projection(self.training)
        if call.skip_sinks:
            return general_only(h, g, m.sinks, state.general_scale(call))
        return h if m.behind_norm else _apply_sinks(m, h, call)


class SinkNorm(SinkProjection):
    """A norm over the hidden neurons between the input and output projections: the sinks are
    applied at its input. With sinks off the input projections computed the general neurons only,
    so the sinks are zeros here and the norm's statistics still run over the full width, as they
    do in the ``remove_sinks()`` model (which keeps that width with zero sink weights).

    The general eval scale stays at the output projection, after the norm: before it, an RMSNorm
    would cancel it (up to its epsilon), and there it folds exactly into the output weights."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.memsink
        call = m.state.call_for_projection(self.training)
        if call.skip_sinks:  # (an adapter on an input projection makes every neuron computed)
            h = general_only(h, m.general, m.sinks, 1.0)
        else:
            h = _apply_sinks(m, h, call)
        return super().forward(h)


def _apply_sinks(m: ProjectionPatch, h: torch.Tensor, call: ForwardSinks) -> torch.Tensor:
    """``h`` with its sink part masked by the call's IDs (``"mask"`` calls) or weighted by the
    eval mode's coefficients (``"coef"`` calls)."""
    if call.kind != "mask":
        return h * m.state.coefficients(call, m.layer, m.general, m.sinks, h)
    keep = m.state.keep_mask(call, m.layer, m.sinks)
    # (under torch.compile the bool mask: inductor fuses the multiply, and the graph stays free of the cache)
    eager = not torch.compiler.is_compiling()
    factor = m.state.keep_factor(call, m.layer, m.sinks, h.dtype) if eager else None
    shared = m.state.backward_factors(call, m.layer, m.sinks) if eager else None
    if h.dim() != keep.dim():  # OPT flattens (B, T, ·) to (B * T, ·) around its MLP
        shape = h.shape
        return MaskSinks.apply(h.reshape(keep.shape[0], -1, shape[-1]), keep, factor, m.general, False,
                               shared).reshape(shape)
    return MaskSinks.apply(h, keep, factor, m.general, maskable_in_place(h), shared)


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _subclass(base: type, role: str) -> type:
    key = (base, role)
    if key not in _SUBCLASSES:
        mixin = {"in": SinkInProjection, "out": SinkOutProjection, "norm": SinkNorm}[role]
        cls = type(f"MemSink{base.__name__}", (mixin, base), {})
        cls.__module__ = __name__
        _SUBCLASSES[key] = cls
    return _SUBCLASSES[key]


def _new_patched_projection(base: type, role: str) -> nn.Module:
    """Unpickling: an empty instance of the patched class of ``base`` (state is set next)."""
    cls = _subclass(base, role)
    return cls.__new__(cls)


def is_patched_projection(module: nn.Module) -> bool:
    return isinstance(module, SinkProjection)


def trainable_neuron_tensors(model: nn.Module, part: str):
    """``(parameter, neuron dim, spans)`` of every trainable neuron-indexed tensor of the patched
    projections, ``part`` "sink" or "general" choosing whose spans; where the sinks are stored
    apart (:mod:`~hf_memsinks.layers.sink_parts`), their parameters are sinks whole and the
    general neurons' tensors general whole."""
    out = []
    for m in model.modules():
        if not is_patched_projection(m):
            continue
        apart = sink_parts.parts(m)
        for name, dim in m.neuron_dims().items():
            param = getattr(m, name)
            if not param.requires_grad:
                continue
            if name not in apart:
                out.append((param, dim, getattr(m.memsink, f"{part}_spans")))
            elif part == "general":
                out.append((param, dim, [(0, param.shape[dim])]))
        if part == "sink":
            out += [(p, dim, [(0, p.shape[dim])]) for name, p in apart.items()
                    if p.requires_grad for dim in [m.neuron_dims()[name]]]
    return out


def _set_width_attrs(module: nn.Module, role: str, features: int) -> None:
    """Keep nn.Linear's in/out_features and Conv1D's nf in step with the weight."""
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if role == "in" else "in_features", features)
    elif hasattr(module, "nf"):
        setattr(module, "nf" if role == "in" else "nx", features)


def patch_projection(module: nn.Module, role: str, *, general: int, sinks: int, chunks: int, layer: int,
                     state: SinkState, external_width: int, behind_norm: bool = False) -> None:
    """Turn ``module`` into a sink-aware projection of ``general + sinks`` neurons per chunk (its
    weight holds them already, or only the general ones until :meth:`SinkProjection.grow`), or
    (``role="norm"``) a norm over the hidden neurons into one that applies the sinks at its input;
    ``behind_norm``: this output projection reads such a norm's output."""
    module.memsink = ProjectionPatch(role, general, sinks, chunks, layer, external_width, state, type(module),
                                     behind_norm=behind_norm)
    module.__class__ = _subclass(type(module), role)
    drop_hub_kernel(module)  # the sinks are in this class's forward
    if role in ("out", "norm"):
        state.masked_sites.add((layer, sinks))
    _set_width_attrs(module, role, (general + sinks) * module.memsink.neuron_chunks)


def unpatch_projection(module: nn.Module) -> None:
    """Give ``module`` back its original class and drop its patch state (its weights are the
    caller's business)."""
    m = module.memsink
    m.remove_hooks()
    del module.memsink
    module.__class__ = m.base_class
    _set_width_attrs(module, m.role, module.weight.shape[neuron_dim(module, m.role)])
