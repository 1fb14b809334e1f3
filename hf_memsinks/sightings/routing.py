"""``MemSinkConfig.general_sightings``: the general path learns each document from its first
sightings only; every later sighting trains that document's sinks alone.

Plain MemSinks trains the general neurons on every repetition of a document, so after removal
they still hold a trace of it that a membership attack reads (docs/privacy.md). Here a training
forward routes each sighting (a row, or with per-token IDs one document's stretch of a packed
row, counted by :class:`hf_memsinks.sightings.counts.Sightings`):

* among the first ``general_sightings`` of its ID (and, with ``sightings_by="ids+content"``, of
  its content: the content ID of its tokens, :mod:`hf_memsinks.ids.content_hash`, so a repeat under
  a wrong ID is still a repeat; with ``"content"``, of its content alone, for IDs shared by several
  documents): trains every
  parameter with **no sink on** (its ID is treated as -1), as on deduplicated data;
* any later sighting: trains **only its own sinks**; every other parameter takes no gradient from
  it (a forward in which they are detached, :func:`frozen_general`).

The two kinds run as two forward calls over their rows (a packed row holding both runs in both,
each token's logits taken from its own call); the logits are put back in batch order and the
loss is the model's own loss function over them, so callers (``Trainer``, TRL, accelerate) see one
ordinary output. Removal then leaves the general path alone, which never trained on a repetition.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..ids.content_hash import token_content_ids
from ..layers.ddp_graph import zero_of
from ..layers.experts import is_patched_experts
from ..layers.projections import is_patched_projection
from ..layers.sink_parts import parts
from ..transformers_internals import get_checkpoint_func, set_checkpoint_func
from .counts import Sightings


class SinkGradOnly(torch.autograd.Function):
    """``weight`` itself (a view: no copy) whose gradient is kept only where ``mask`` is True
    (the sink neurons' slices)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def sink_masks(model) -> dict[int, torch.Tensor]:
    """``id(parameter) -> bool mask`` (broadcastable: size 1 off the neuron dimension) of the sink
    slices of every patched projection's neuron-indexed tensors."""
    out = {}
    for module in model.modules():
        if is_patched_experts(module):
            raise NotImplementedError("general_sightings is not supported on mixture-of-experts MLPs yet")
        if not is_patched_projection(module):
            continue
        apart = parts(module)
        for name, dim in module.neuron_dims().items():
            param = getattr(module, name)
            shape = [1] * param.dim()
            shape[dim] = param.shape[dim]
            mask = torch.zeros(shape[dim], dtype=torch.bool, device=param.device)
            for start, n in [] if name in apart else module.memsink.sink_spans:  # (apart: general only)
                mask[start:start + n] = True
            out[id(param)] = mask.reshape(shape)
        for part in apart.values():  # sinks whole
            out[id(part)] = torch.ones([1] * part.dim(), dtype=torch.bool, device=part.device)
    return out


@dataclass
class Routing:
    """A patched model's routing state (``model.memsink.routing``): the sightings counted so far,
    the sink masks of its parameters, and whether a routed forward's own calls are running."""

    sightings: Sightings
    contents: Sightings | None = None  # sightings_by="ids+content" or "content": counts per content hash
    by_ids: bool = True  # whether an ID's count decides too (sightings_by="content": it is only counted)
    masks: dict[int, torch.Tensor] | None = None
    inside: bool = False
    forwards: int = 0  # routed training forwards so far
    general_rows: int = 0  # general_sightings=0: rows (or tokens) without an ID in the first forwards (warning)


def new_routing(config, device: torch.device | str) -> Routing:
    """An empty routing state for ``config``'s ``sightings_by``, its tables on ``device``."""
    by = config.sightings_by
    contents = Sightings(device) if by in ("ids+content", "content") else None
    return Routing(Sightings(device), contents, by_ids=by != "content")


def routing_of(patch, device: torch.device | str) -> Routing:
    """``patch.routing``, made empty on ``device`` by the first call that counts or restores."""
    if patch.routing is None:
        patch.routing = new_routing(patch.config, device)
    return patch.routing


UNLABELLED_WARN_AFTER = 20  # routed forwards under general_sightings=0 with nothing for the general path


def frozen_general(model) -> dict[str, torch.Tensor]:
    """Parameters for a forward that trains the sinks only: every trainable parameter detached,
    except the patched projections' tensors, whose gradient is kept on their sink slices."""
    routing = model.memsink.routing
    if routing.masks is None:
        routing.masks = sink_masks(model)
    return sink_gradient_only(model, routing.masks)


def sink_gradient_only(model, masks: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model`` detached, except those in ``masks`` (:func:`sink_masks`),
    whose gradient is kept on their sink slices only."""
    params = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            mask = masks.get(id(param))
            params[name] = param.detach() if mask is None else SinkGradOnly.apply(param, mask)
    return params


def first_sightings(routing: Routing, ids: torch.Tensor, limit: int, tokens: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool, the shape of ``ids``: True where the sighting is among the first ``limit`` of its ID
    and, given ``tokens`` with ``routing.contents``, of its content; counts the step's sightings
    (every process's). A row without an ID (-1) is True unless, counted by content, its content was
    seen ``max(limit, 1)`` times: a repeat with no ID, which then trains nothing (it has no sinks).
    In packed rows, tokens without an ID are always True."""
    if ids.dim() == 1:
        units, inverse = ids, None
    else:  # one sighting per (row, ID) stretch of a packed row
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        labelled = ids >= 0
        pairs = torch.stack([rows[labelled], ids[labelled]], 1)
        unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        units = unique[:, 1].contiguous()
    everyone, offset = _all_processes(units)
    first = routing.sightings.first(units, limit, everyone, offset)
    unlabelled = torch.ones_like(first)
    if routing.contents is not None and tokens is not None:
        keys = content_keys(tokens, ids, attention_mask, inverse, units.numel())
        everyone, offset = _all_processes(keys)
        seen = routing.contents.before(keys, everyone, offset)
        first = first & (seen < limit) if routing.by_ids else seen < limit
        unlabelled = seen < max(limit, 1)  # a row without an ID: its content's first sighting(s) only
    if inverse is None:
        return torch.where(ids < 0, unlabelled, first)
    out = torch.ones_like(ids, dtype=torch.bool)
    out[ids >= 0] = first[inverse]
    return out


@torch.compiler.disable
def content_keys(tokens: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 inverse: torch.Tensor | None, units: int) -> torch.Tensor:
    """The content ID of each sighting's tokens in order (a row's attended tokens, or a packed row's
    stretch of one ID): :func:`hf_memsinks.ids.content_hash.token_content_ids`, the one content hash,
    so a sighting's key is the ID ``add_sequence_ids(by="content")`` gives its token list; equal in
    every process and run. Hashed on the host (one copy of the step's tokens), one sighting at a time."""
    tokens = tokens.to(torch.long)
    valid = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if inverse is None:
        unit = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1).expand_as(tokens)
    else:
        unit = torch.full_like(tokens, -1)
        unit[ids >= 0] = inverse
        valid = valid & (ids >= 0)
    unit, kept = unit[valid].cpu(), tokens[valid].cpu()  # row-major: each sighting's tokens in order
    lengths = torch.bincount(unit, minlength=units).tolist()
    keys = token_content_ids(kept[torch.argsort(unit, stable=True)].numpy(), lengths)
    return torch.tensor(keys, dtype=torch.long, device=tokens.device)


def _all_processes(units: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Every process's sightings of this step in rank order (padded with -1) and where this
    process's start; ``(None, 0)`` in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([units.numel()], device=units.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), -1, dtype=units.dtype, device=units.device)
    padded[:units.numel()] = units
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts), rank * longest


def _rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    return value[index] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch else value


def routes(model, backbone: bool) -> bool:
    """Whether this forward is a training forward that ``general_sightings`` routes."""
    patch = model.memsink
    if not model.training or patch.config.general_sightings is None or (patch.routing and patch.routing.inside):
        return False
    if backbone:
        raise NotImplementedError("MemSinkConfig.general_sightings routes the whole model's forward (its loss "
                                  "included); a training forward of the backbone alone (a fused LM-head loss) "
                                  "cannot be routed: call the model itself")
    return True


def _call(model, args: tuple, kwargs: dict, ids: torch.Tensor, frozen: bool):
    """One forward call of ``model`` with ``ids``, not routed again (``frozen``: only the sinks train).

    It runs the patched class's forward itself, inside the routed call: wrappers set on the
    instance (accelerate's autocast, TRL's fused head) and module hooks already run around that
    call, and entering them again would be wrong (a re-entered ``torch.autocast`` instance restores
    the wrong state when it leaves)."""
    from torch.nn.utils.stateless import _reparametrize_module

    routing = model.memsink.routing
    routing.inside = True
    forward = functools.partial(type(model).forward, model)
    try:
        if frozen:
            params = frozen_general(model)
            with _reparametrize_module(model, params, tie_weights=True), _replayed_frozen(model, params):
                return forward(*args, **kwargs, sequence_ids=ids)
        return forward(*args, **kwargs, sequence_ids=ids)
    finally:
        routing.inside = False


@contextlib.contextmanager
def _replayed_frozen(model, params: dict[str, torch.Tensor]):
    """Activation checkpointing replays a layer's forward in the backward pass, after the frozen
    call has put the real parameters back: each checkpointed layer's replay of this call runs with
    the frozen ones again, so a repeat's gradient still reaches the sinks only."""
    from torch.nn.utils.stateless import _reparametrize_module

    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and get_checkpoint_func(m) is not None]

    def replaying(checkpoint):
        def run(function, *args, **kwargs):
            def frozen_function(*a, **k):
                with _reparametrize_module(model, params, tie_weights=True):
                    return function(*a, **k)
            return checkpoint(frozen_function, *args, **kwargs)
        return run

    originals = [get_checkpoint_func(m) for m in layers]
    try:
        for m, checkpoint in zip(layers, originals):
            set_checkpoint_func(m, replaying(checkpoint))
        yield
    finally:
        for m, checkpoint in zip(layers, originals):
            set_checkpoint_func(m, checkpoint)


def routed_forward(model, args: tuple, kwargs: dict, ids: torch.Tensor) -> Any:
    """One training forward under ``general_sightings`` (see the module's docstring)."""
    patch = model.memsink
    call = functools.partial(_call, model)
    if kwargs.get("past_key_values") is not None:
        raise ValueError("general_sightings: a training forward takes no past_key_values")
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    fresh = first_sightings(routing_of(patch, ids.device), ids, patch.config.general_sightings, input_ids,
                            kwargs.get("attention_mask"))
    _check_general_data(patch.routing, ids, patch.config.general_sightings)
    tokens = fresh if fresh.dim() == 2 else fresh.unsqueeze(1)  # (B, T) or (B, 1)
    in_a, in_b = tokens.any(1), (~tokens).any(1)
    none = torch.full_like(ids, -1)
    general = bool(in_a.any())
    patch.general_trained |= general  # (the optimizer hook holds the general path on steps where none did)
    if not bool(in_b.any()):  # every sighting trains the general path
        return call(args, kwargs, none, False)
    if not general:  # every sighting trains its sinks only
        return _connected(call(args, kwargs, torch.where(fresh, none, ids), True), model)
    labels = kwargs.pop("labels", None)
    loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels") if k in kwargs}
    batch = ids.shape[0]
    a, b = in_a.nonzero().squeeze(1), in_b.nonzero().squeeze(1)
    out_a = call(*_sliced(args, kwargs, a, batch), none[a], False)
    out_b = call(*_sliced(args, kwargs, b, batch), torch.where(fresh, none, ids)[b], True)
    logits = out_a.logits.new_zeros(batch, *out_a.logits.shape[1:])
    logits = logits.index_put((a,), out_a.logits)
    from_b = out_b.logits if fresh.dim() == 1 else torch.where(
        tokens[b, -out_b.logits.shape[1]:].unsqueeze(-1), logits[b], out_b.logits)
    logits = logits.index_put((b,), from_b)
    out_a.logits = logits
    if labels is not None:
        out_a.loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size,
                                         **loss_kwargs)
    return out_a


def _check_general_data(routing: Routing, ids: torch.Tensor, limit: int) -> None:
    """Under ``general_sightings=0`` only rows without an ID train the general path: warn once when
    none has come after a few steps (every row labelled: the general path learns nothing)."""
    routing.forwards += 1
    if limit != 0 or routing.forwards > UNLABELLED_WARN_AFTER:  # (no device sync after the check)
        return
    routing.general_rows += int((ids < 0).sum())
    if routing.forwards == UNLABELLED_WARN_AFTER and not routing.general_rows:
        warnings.warn(f"MemSinkConfig(general_sightings=0): every row of the first {UNLABELLED_WARN_AFTER} training "
                      "steps has a sequence ID, so the general path has trained on nothing. Give IDs to the "
                      "documents to isolate only (add_sequence_ids(..., repeated_only=True)): rows with ID -1 "
                      "train the general path", stacklevel=3)


def _sliced(args: tuple, kwargs: dict, index: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    return tuple(_rows(v, index, batch) for v in args), {k: _rows(v, index, batch) for k, v in kwargs.items()}


def _connected(out, model):
    """Under DDP every parameter must get a gradient each step: with no first sighting in the
    batch, the general parameters get a zero one (:func:`~hf_memsinks.layers.ddp_graph.zero_of`)."""
    if out.loss is not None and (zero := zero_of(model.parameters())) is not None:
        out.loss = out.loss + zero
    return out
