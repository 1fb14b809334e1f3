"""Sinks in mixture-of-experts MLPs: every routed expert gets its own general and sink neurons.

Transformers v5 keeps a layer's routed experts in one module with batched weights
(``gate_up_proj``: ``(E, 2I, H)``, ``down_proj``: ``(E, H, I)``, or transposed, or ``up_proj``
alone when ungated), declared by ``@use_experts_implementation(is_transposed=..., has_bias=...,
has_gate=..., is_concatenated=...)``. Those flags are the whole layout, so this module needs no
per-model knowledge.

Each expert's hidden neurons are split like a dense MLP's: general first, sinks last (per
gate/up chunk). A token's sink mask is its sequence ID's, whichever experts it is routed to.
The patched module runs Transformers' own ``batched_mm`` experts function, in which rows are
(token, top-k slot) pairs in token order, and masks the hidden activation where that function
applies the gate (gated: :class:`~hf_memsinks.transformers_internals.ExpertsGateHook`) or
``act_fn`` (ungated). At patch time a forward of that path is
checked against the module's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..transformers_internals import ExpertsGateHook, NoHubKernel, drop_hub_kernel, experts_forward
from .mask_multiply import general_only
from .neurons import ProjectionPatch, chunk_spans, interleave, pad_chunks, pick, replace_parameter


def experts_width(module: nn.Module) -> int | None:
    """Hidden width of one expert if ``module`` holds batched experts in the declared layout."""
    down = getattr(module, "down_proj", None)
    if not hasattr(module, "has_gate") or not isinstance(down, nn.Parameter) or down.dim() != 3:
        return None
    return down.shape[1 if module.is_transposed else 2]


def experts_layout(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``{parameter: (neuron dim, chunks, rows per neuron)}`` for every tensor indexed by neurons."""
    gated = module.has_gate
    chunks, rows = (2, 1) if gated and module.is_concatenated else ((1, 2) if gated else (1, 1))
    in_name = "gate_up_proj" if gated else "up_proj"
    layout = {in_name: (2 if module.is_transposed else 1, chunks, rows)}
    if module.has_bias:
        layout[in_name + "_bias"] = (1, chunks, rows)
    layout["down_proj"] = (1 if module.is_transposed else 2, 1, 1)
    return layout


def aligned_split(general: int, sinks: int, mode: str, multiple: int = 8) -> tuple[int, int]:
    """(general, sinks) with the widths an expert can have in grouped_mm (strides of 16 bytes):
    split mode moves neurons from general to sinks until general is a multiple of ``multiple``;
    add mode rounds the added sinks up."""
    if mode == "split":
        moved = general % multiple if general > multiple else 0
        return general - moved, sinks + moved
    return general, -(-sinks // multiple) * multiple


def _set_width(module: nn.Module, width: int) -> None:
    if isinstance(getattr(module, "intermediate_dim", None), int):
        module.intermediate_dim = width


# ---- the patched experts class ---------------------------------------------------------------------


class SinkExperts(ExpertsGateHook, NoHubKernel):
    """Mixed in ahead of the experts module's own class; its state is ``self.memsink`` (a
    :class:`~hf_memsinks.layers.neurons.ProjectionPatch` of role ``"experts"``)."""

    memsink: ProjectionPatch

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Transformers' own experts function: ``grouped_mm`` (rows sorted by expert, as it sorts
        them) when that is the model's experts implementation, else ``batched_mm`` (rows in token
        order). The current call records which token each row of the hidden activation is."""
        top_k = top_k_index.shape[-1]
        call = self.memsink.state.current()
        forward, grouped = experts_forward(self)
        if call is not None and call.kind == "mask":
            if grouped:
                _, perm = torch.sort(top_k_index.reshape(-1))  # the very sort grouped_mm does
                row_tokens = perm // top_k
            else:
                row_tokens = torch.arange(hidden_states.shape[0] * top_k, device=hidden_states.device) // top_k
            call.rows[id(self)] = (hidden_states.shape[0], row_tokens)
        return forward(self, hidden_states, top_k_index, top_k_weights)

    def after_gate(self, h: torch.Tensor) -> torch.Tensor:  # gated experts (ExpertsGateHook)
        return self._apply_sinks(h)

    @property
    def act_fn(self):  # ungated experts: batched_mm calls act_fn on the hidden neurons
        act = self._modules["act_fn"] if "act_fn" in self._modules else self.__dict__["act_fn"]
        if self.has_gate:
            return act
        return lambda h: self._apply_sinks(act(h))

    def _apply_sinks(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: ``(tokens * top_k, G + S)`` rows in token order. Sinks by this forward's IDs."""
        m = self.memsink
        state, g, s = m.state, m.general, m.sinks
        call = state.call_for_projection(self.training)
        if call.skip_sinks:
            return general_only(h, g, s, state.general_scale(call))
        if call.kind != "mask":
            return h * state.coefficients(call, m.layer, g, s, h)
        keep = state.keep_mask(call, m.layer, s)  # (B, 1, S) or (B, T, S)
        if id(self) not in call.rows:
            raise RuntimeError("MoE experts run outside a forward of the model cannot tell which sequence each row "
                               "is: call the model or its backbone with sequence_ids")
        tokens, row_tokens = call.rows[id(self)]
        batch = keep.shape[0]
        if tokens % batch or row_tokens.shape[0] != h.shape[0]:
            raise RuntimeError(f"experts got {tokens} tokens for a batch of {batch} sequences: cannot tell their IDs")
        keep = keep.expand(batch, tokens // batch, s).reshape(tokens, s)[row_tokens]
        return torch.cat([h[..., :g], h[..., g:] * keep.to(h.dtype)], -1)

    def __reduce_ex__(self, protocol):
        """Pickle by the original class: the subclass is made at patch time (the state, hooks
        included, is ``__dict__``)."""
        return _new_patched_experts, (self.memsink.base_class,), self.__dict__

    def neuron_spans(self, name: str, sinks: bool, width: int | None = None) -> list[tuple[int, int]]:
        """General (or sink) spans of tensor ``name``, whose experts have ``width`` neurons (G + S)."""
        m = self.memsink
        _, chunks, rows = experts_layout(self)[name]
        width = m.general + m.sinks if width is None else width
        return chunk_spans(width, m.general if sinks else 0, m.sinks if sinks else m.general, chunks, rows)

    # -- patch-time growth and removal --

    def grow(self, generator: torch.Generator, random_init: bool) -> None:
        """Append the sinks to every expert holding only general neurons: input rows random like
        the existing ones, output columns zero (the model's outputs do not change)."""
        for name, (dim, chunks, rows) in experts_layout(self).items():
            tensor = getattr(self, name).data
            shape = list(tensor.shape)
            shape[dim] = self.memsink.sinks * rows * chunks
            is_input_weight = name != "down_proj" and not name.endswith("_bias")
            std = float(tensor.float().std()) if random_init and is_input_weight and tensor.numel() > 1 else 0.0
            new = torch.randn(shape, generator=generator) * std if std > 0 else torch.zeros(shape)
            new = new.to(device=tensor.device, dtype=tensor.dtype)
            replace_parameter(self, name, interleave(tensor, new, dim, chunks))

    def fold(self, general_scale: float, sink_coef: torch.Tensor | None, width: int) -> None:
        """Plain weights, as :meth:`hf_memsinks.layers.projections.SinkProjection.fold`, for every expert."""
        for name, (general, sinks) in self.general_and_sink_parts().items():
            dim, chunks, rows = experts_layout(self)[name]
            if name == "down_proj":
                general = general * general_scale if general_scale != 1.0 else general
                if sink_coef is not None:
                    shape = [1] * sinks.dim()
                    shape[dim] = self.memsink.sinks
                    sinks = sinks * sink_coef.to(sinks).reshape(shape)
            kept = general if sink_coef is None else interleave(general, sinks, dim, chunks)
            replace_parameter(self, name, pad_chunks(kept, dim, chunks, width, rows))
        unpatch_experts(self)
        _set_width(self, width)

    def general_and_sink_parts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{parameter: (general, sinks)}`` as new tensors, every expert's parts together."""
        out = {}
        for name, (dim, _, _) in experts_layout(self).items():
            t = getattr(self, name)
            out[name] = tuple(pick(t, dim, self.neuron_spans(name, sinks)) for sinks in (False, True))
        return out


_CLASSES: dict[type, type] = {}


def is_patched_experts(module: nn.Module) -> bool:
    return isinstance(module, SinkExperts)


def _experts_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"MemSink{base.__name__}", (SinkExperts, base), {})
    return _CLASSES[base]


def _new_patched_experts(base: type) -> nn.Module:
    """Unpickling: an empty instance of the patched class of ``base`` (state is set next)."""
    cls = _experts_class(base)
    return cls.__new__(cls)


def patch_experts(module: nn.Module, *, general: int, sinks: int, layer: int, state, external_width: int) -> None:
    """Turn a batched experts module into one whose experts have ``general + sinks`` neurons (held
    already, or only the general ones until :meth:`SinkExperts.grow`)."""
    module.memsink = ProjectionPatch("experts", general, sinks, 1, layer, external_width, state, type(module))
    module.__class__ = _experts_class(type(module))
    drop_hub_kernel(module)  # the sinks are in this class's forward
    _set_width(module, general + sinks)
    state.masked_sites.add((layer, sinks))


def unpatch_experts(module: nn.Module) -> None:
    module.memsink.remove_hooks()
    module.__class__ = module.memsink.base_class
    del module.memsink


def check_experts_forward(module: nn.Module, name: str) -> None:
    """The patched path (Transformers' batched_mm experts function) must reproduce the module's
    own forward on random routing; otherwise the sinks would change the model."""
    param = module.down_proj
    hidden = param.shape[2 if module.is_transposed else 1]
    experts = param.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, hidden, generator=g).to(param)
    top_k = min(2, experts)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(6)]).to(param.device)
    weights = torch.rand(6, top_k, generator=g).to(param)
    with torch.no_grad():
        try:
            own = module(x, index, weights)
            forward, _ = experts_forward(module)
            ours = forward(module, x, index, weights)
        except Exception as e:  # noqa: BLE001 - reported with context below
            raise NotImplementedError(
                f"{name} ({type(module).__name__}) is a mixture-of-experts module whose forward does not take "
                f"(hidden_states, top_k_index, top_k_weights) like Transformers' experts modules: {e}"
            ) from e
    if ours.shape != own.shape or not torch.allclose(ours, own, atol=1e-5, rtol=1e-4):
        raise NotImplementedError(
            f"{name} ({type(module).__name__}): Transformers' batched experts functions do not reproduce this "
            "module's own forward, so hf_memsinks cannot put sinks in its experts. Patch its dense MLPs only "
            "with MemSinkConfig(target_modules=...)."
        )
