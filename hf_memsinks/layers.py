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

In a checkpoint the two parts are separate tensors: ``weight`` holds the general neurons (with
zeros where sinks were, when the model config cannot express a narrower MLP) and
``sink_weight`` / ``sink_bias`` the sinks, so a plain Transformers load gets a sink-free model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import neuron_dim
from .state import ForwardSinks, SinkState

class _MaskSinks(torch.autograd.Function):
    """``h`` with its sink part multiplied by a bool mask. Saves only the (shared, compact) mask
    for backward, not a full-width float copy of it.

    Where it is safe, the mask is applied in place: no new activation-sized tensor, which on CPU
    means no fresh pages to fault in (a full copy per layer measured ~4% of a training step).
    Safe = ``h`` is not a view and the op that made it does not keep its *output* for backward:
    products (SwiGLU, tanh-GELU) and GELU/SiLU keep their inputs. Anything else (ReLU keeps its
    output) gets a masked copy. The incoming gradient is masked in place: it is the fresh output
    of the projection's matmul backward and has no other reader.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, keep: torch.Tensor, num_general: int, in_place: bool) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.num_general = num_general
        if in_place:
            h.narrow(-1, num_general, h.shape[-1] - num_general).mul_(keep)
            ctx.mark_dirty(h)
            return h
        return _apply_keep(h, keep, num_general)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        g = ctx.num_general
        if grad.is_contiguous() and not torch.compiler.is_compiling():  # (a view of the matmul's fresh result is fine)
            grad.narrow(-1, g, grad.shape[-1] - g).mul_(keep)
            return grad, None, None, None
        return _apply_keep(grad, keep, g), None, None, None


# grad_fn types whose backward keeps their inputs, never their output: masking their output in
# place cannot corrupt a saved tensor (autograd's version counter would catch it anyway).
_KEEPS_INPUTS_ONLY = frozenset({"MulBackward0", "GeluBackward0", "SiluBackward0"})


def _maskable_in_place(h: torch.Tensor) -> bool:
    if h._base is not None or not h.is_contiguous():
        return False
    # Without a graph (inference) we cannot tell a fresh activation from a caller's tensor: copy.
    # Under torch.compile, keep the graph functional (inductor fuses the copy away).
    if torch.compiler.is_compiling():
        return False
    return h.grad_fn is not None and type(h.grad_fn).__name__ in _KEEPS_INPUTS_ONLY


def _apply_keep(x: torch.Tensor, keep: torch.Tensor, num_general: int) -> torch.Tensor:
    out = x.clone()
    out[..., num_general:].mul_(keep)
    return out


# ---- the projection subclasses ---------------------------------------------------------------------


class _SinkProjection:
    """Mixed into a copy of the projection's own class. Attributes set by :func:`patch_projection`."""

    memsink_role: str  # "in", "out" or "norm"
    memsink_general: int
    memsink_sinks: int
    memsink_chunks: int
    memsink_layer: int
    memsink_external_width: int  # general width written to checkpoints (G, or G + S zero-padded)
    _memsink_state: SinkState

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.t() if neuron_dim(self, "in") == 1 else self.weight

    # -- layout helpers: neuron index ranges of general and sink parts --

    def _ranges(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        g, s = self.memsink_general, self.memsink_sinks
        chunks = self.memsink_chunks if self.memsink_role == "in" else 1
        width = g + s
        return [(k * width, g) for k in range(chunks)], [(k * width + g, s) for k in range(chunks)]

    def _parts(self, tensor: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        general, sinks = self._ranges()
        pick = lambda spans: torch.cat([tensor.narrow(dim, a, n) for a, n in spans], dim)  # noqa: E731
        return pick(general), pick(sinks)

    def _external_general(self, tensor: torch.Tensor, dim: int, general: torch.Tensor) -> torch.Tensor:
        if self.memsink_external_width == self.memsink_general:
            return general
        padded = tensor.detach().clone()
        for start, n in self._ranges()[1]:
            padded.narrow(dim, start, n).zero_()
        return padded

    def _param_dims(self) -> dict[str, int]:
        dims = {"weight": neuron_dim(self, self.memsink_role)}
        if self.memsink_role in ("in", "norm") and getattr(self, "bias", None) is not None:
            dims["bias"] = 0
        return dims

    def general_and_sink_parts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"weight": (general, sinks), "bias": (...)}`` as new tensors (for tests and export)."""
        return {name: self._parts(getattr(self, name), dim) for name, dim in self._param_dims().items()}

    # -- checkpoint format: general part under the original names, sinks under sink_* --

    @property
    def sink_weight(self) -> torch.Tensor:
        """The sink part of the weight (a copy), named as in checkpoints; lets tools that map
        state-dict keys back to attributes (torch.distributed.checkpoint) resolve ``sink_weight``."""
        return self.general_and_sink_parts()["weight"][1]

    @property
    def sink_bias(self) -> torch.Tensor | None:
        parts = self.general_and_sink_parts()
        return parts["bias"][1] if "bias" in parts else None

    def memsink_layout(self) -> dict:
        """What the checkpoint tensors of this projection mean: its neuron layout and the mask
        settings that decide which sinks belong to which sequence ID. Saved in the state dict's
        metadata and compared on load, so weights never land on the wrong neurons."""
        c = self._memsink_state.config
        return {"role": self.memsink_role, "general": self.memsink_general, "sinks": self.memsink_sinks,
                "chunks": self.memsink_chunks, "sink_active_prob": c.sink_active_prob, "salt": c.salt,
                "mask_scheme": c.mask_scheme, "per_layer_masks": c.per_layer_masks,
                "layer": self.memsink_layer if c.per_layer_masks else None}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and isinstance(metadata.get(prefix[:-1]), dict):
            metadata[prefix[:-1]]["memsink"] = self.memsink_layout()
        for name, dim in self._param_dims().items():
            tensor = getattr(self, name).detach()
            if hasattr(tensor, "full_tensor"):
                # Sharded (FSDP2 DTensor): general and sink rows interleave across shards, so the
                # split needs the whole tensor. Full-state-dict export is what this is for.
                tensor = tensor.full_tensor()
            general, sinks = self._parts(tensor, dim)
            destination[prefix + name] = self._external_general(tensor, dim, general).contiguous()
            destination[prefix + "sink_" + name] = sinks.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        general_spans, sink_spans = self._ranges()
        dims = self._param_dims()
        saved, mine = (local_metadata or {}).get("memsink"), self.memsink_layout()
        if saved is not None and saved != mine:
            differ = ", ".join(f"{k} {saved.get(k)!r} vs {mine[k]!r}" for k in mine if saved.get(k) != mine[k])
            error_msgs.append(
                f"sink layout mismatch for {prefix[:-1]}: the state dict was saved with another sink layout than "
                f"this model's (state dict vs this model: {differ}); its tensors would land on the wrong neurons"
            )
            for key in [prefix + n for n in dims] + [prefix + "sink_" + n for n in dims]:
                state_dict.pop(key, None)
            return
        for name, dim in dims.items():
            param = getattr(self, name)
            for part, spans, width in (
                (name, general_spans, None),
                ("sink_" + name, sink_spans, self.memsink_sinks),
            ):
                key = prefix + part
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict.pop(key)
                expected = sum(n for _, n in spans)
                full = param.shape[dim]
                layout = f"general={self.memsink_general}, sinks={self.memsink_sinks}"
                others = lambda t: [d for i, d in enumerate(t.shape) if i != dim]  # noqa: E731
                if value.dim() != param.dim() or others(value) != others(param):
                    error_msgs.append(f"size mismatch for {key}: the state dict has shape {tuple(value.shape)}, this "
                                      f"model ({layout}) expects {tuple(param.shape)} up to the neuron dim {dim}")
                    continue
                if part == name and value.shape[dim] == full != expected:
                    # Zero-padded general part (config cannot describe a narrower MLP): take the
                    # general positions; the sink positions must hold the padding zeros.
                    if any(bool(value.narrow(dim, a, n).any()) for a, n in sink_spans):
                        error_msgs.append(
                            f"{key}: the state dict's tensor has nonzero values where this model ({layout}) keeps "
                            "its sinks, so it was not saved with this sink layout"
                        )
                        continue
                    value = self._parts(value, dim)[0]
                if value.shape[dim] != expected:
                    what = "general" if part == name else "sink"
                    error_msgs.append(
                        f"size mismatch for {key}: the state dict has {value.shape[dim]} {what} neurons along dim {dim} "
                        f"(shape {tuple(value.shape)}), this model ({layout}) expects {expected}"
                        + (f" (or {full} zero-padded)" if part == name and full != expected else "")
                        + ": it was saved with another sink layout"
                    )
                    continue
                copy_into_spans(param, dim, spans, value)
        # Anything else this module owns (the output projection's bias) loads as usual.
        load_other_keys(super()._load_from_state_dict, state_dict, prefix, dims, local_metadata, strict,
                        missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, general={self.memsink_general}, sinks={self.memsink_sinks}"

    def __reduce_ex__(self, protocol):
        """Pickle by the original class and role: the subclass is made at patch time."""
        return _new_patched_projection, (self._memsink_base_class, self.memsink_role), self.__dict__


@torch.no_grad()
def copy_into_spans(param: torch.Tensor, dim: int, spans, value: torch.Tensor) -> None:
    """Copy ``value``'s slices, in order, into the ``(start, length)`` spans of ``param`` along ``dim``."""
    offset = 0
    for start, n in spans:
        param.narrow(dim, start, n).copy_(value.narrow(dim, offset, n))
        offset += n


def load_other_keys(base_load, state_dict, prefix, names, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    """Load the keys of a sink-patched module other than its split tensors (``names`` and their
    ``sink_`` parts) through the base class's loader, which must not report those as missing."""
    handled = {prefix + n for n in names} | {prefix + "sink_" + n for n in names}
    rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in handled}
    before = len(missing_keys)
    base_load(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    missing_keys[before:] = [k for k in missing_keys[before:] if k not in handled]


class _SinkInProjection(_SinkProjection):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._memsink_state.call_for_projection(self.training)
        if not call.skip_sinks or self.memsink_wrapped:
            return super().forward(x)  # every neuron: exactly the plain module's computation
        weight, bias = self._linear_weight(), self.bias
        spans = self._ranges()[0]
        outs = [F.linear(x, weight[a : a + n], None if bias is None else bias[a : a + n]) for a, n in spans]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class _SinkOutProjection(_SinkProjection):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        state, g = self._memsink_state, self.memsink_general
        if self._memsink_prepared:  # an adapter wrapper's pre-hook already applied the sinks
            self._memsink_prepared = False
            return super().forward(h)
        call = state.call_for_projection(self.training)
        if call.skip_sinks:
            h = h[..., :g] if h.shape[-1] != g else h
            scale = state.general_scale(call)
            return F.linear(h * scale if scale != 1.0 else h, self._linear_weight()[:, :g], self.bias)
        return super().forward(self.sink_input(h, call))

    def sink_input(self, h: torch.Tensor, call: ForwardSinks | None = None) -> torch.Tensor:
        """The full-width input the current call's sinks allow: sink part masked (training,
        activate) or weighted (expected, exclude); with sinks off, zero sinks and scaled general part.
        Behind a norm over the hidden neurons the masks and weights were applied at its input."""
        state, g = self._memsink_state, self.memsink_general
        if call is None:
            call = state.call_for_projection(self.training)
        if call.skip_sinks:
            general = h[..., :g]
            scale = state.general_scale(call)
            general = general * scale if scale != 1.0 else general
            return torch.cat([general, general.new_zeros(*general.shape[:-1], self.memsink_sinks)], dim=-1)
        return h if self.memsink_behind_norm else _apply_sinks(self, h, call)


class _SinkNorm(_SinkProjection):
    """A norm over the hidden neurons between the input and output projections: the sinks are
    applied at its input. With sinks off the input projections computed the general neurons only,
    so the sinks are zeros here and the norm's statistics still run over the full width, as they
    do in the ``remove_sinks()`` model (which keeps that width with zero sink weights).

    The general eval scale stays at the output projection, after the norm: before it, an RMSNorm
    would cancel it (up to its epsilon), and there it folds exactly into the output weights."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        call = self._memsink_state.call_for_projection(self.training)
        g, s = self.memsink_general, self.memsink_sinks
        if call.skip_sinks:  # (an adapter on an input projection makes every neuron computed)
            general = h[..., :g] if h.shape[-1] != g else h
            h = torch.cat([general, general.new_zeros(*general.shape[:-1], s)], dim=-1)
        else:
            h = _apply_sinks(self, h, call)
        return super().forward(h)


def _apply_sinks(module: _SinkProjection, h: torch.Tensor, call: ForwardSinks) -> torch.Tensor:
    """``h`` with its sink part masked by the call's IDs (``"mask"`` calls) or weighted by the
    eval mode's coefficients (``"coef"`` calls)."""
    state, g = module._memsink_state, module.memsink_general
    if call.kind == "mask":
        keep = state.keep_mask(call, module.memsink_layer, module.memsink_sinks)
        if h.dim() != keep.dim():  # OPT flattens (B, T, ·) to (B * T, ·) around its MLP
            shape = h.shape
            return _MaskSinks.apply(h.reshape(keep.shape[0], -1, shape[-1]), keep, g, False).reshape(shape)
        return _MaskSinks.apply(h, keep, g, _maskable_in_place(h))
    return h * state.coefficients(call, module.memsink_layer, g, module.memsink_sinks, h)


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _subclass(base: type, role: str) -> type:
    key = (base, role)
    if key not in _SUBCLASSES:
        mixin = {"in": _SinkInProjection, "out": _SinkOutProjection, "norm": _SinkNorm}[role]
        cls = type(f"MemSink{base.__name__}", (mixin, base), {"_memsink_base_class": base})
        cls.__module__ = __name__
        _SUBCLASSES[key] = cls
    return _SUBCLASSES[key]


def _new_patched_projection(base: type, role: str) -> nn.Module:
    """Unpickling: an empty instance of the patched class of ``base`` (state is set next)."""
    cls = _subclass(base, role)
    return cls.__new__(cls)


def is_patched_projection(module: nn.Module) -> bool:
    return isinstance(module, _SinkProjection)


def _set_width_attrs(module: nn.Module, role: str, features: int) -> None:
    """Keep nn.Linear's in/out_features and Conv1D's nf in step with the weight."""
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if role == "in" else "in_features", features)
    elif hasattr(module, "nf"):
        setattr(module, "nf" if role == "in" else "nx", features)


def patch_projection(
    module: nn.Module,
    role: str,
    *,
    general: int,
    sinks: int,
    chunks: int,
    layer: int,
    state: SinkState,
    external_width: int,
    behind_norm: bool = False,
) -> None:
    """Turn ``module`` (already holding general + sink neurons) into a sink-aware projection, or
    (``role="norm"``) a norm over the hidden neurons into one that applies the sinks at its input;
    ``behind_norm``: this output projection reads such a norm's output."""
    module.__class__ = _subclass(type(module), role)
    module.memsink_role = role
    module.memsink_general = general
    module.memsink_sinks = sinks
    module.memsink_chunks = chunks
    module.memsink_layer = layer
    module.memsink_external_width = external_width
    module._memsink_state = state
    module.memsink_behind_norm = behind_norm
    if role in ("out", "norm"):
        state.masked_sites.add((layer, sinks))
    module.memsink_wrapped = False  # set while an adapter (PEFT LoRA) wraps this projection
    module._memsink_prepared = False
    _set_width_attrs(module, role, (general + sinks) * (chunks if role == "in" else 1))


def unpatch_projection(module: nn.Module) -> None:
    """Give ``module`` back its original class (its weights are the caller's business)."""
    role = module.memsink_role
    module.__class__ = module._memsink_base_class
    for attr in ("memsink_role", "memsink_general", "memsink_sinks", "memsink_chunks", "memsink_layer",
                 "memsink_external_width", "_memsink_state", "memsink_wrapped", "_memsink_prepared",
                 "memsink_behind_norm"):
        delattr(module, attr)
    dim = neuron_dim(module, role)
    _set_width_attrs(module, role, module.weight.shape[dim])
