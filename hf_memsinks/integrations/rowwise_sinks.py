"""``MemSinkConfig.sink_optimizer="rowwise"``: the sinks step by a rule of their own that keeps one
value per sink neuron, so the optimizer keeps no state for them.

Under AdamW a sink weight costs what every weight costs: itself, its gradient and two moments (16
bytes in fp32). Measured on ``make finetune``'s setting (docs/performance.md, "What the memory target
needs"), the sinks isolate as well without the moments: a touched sink neuron (one whose gradient is
not zero: its documents were in the batch) moves by ``g / (sqrt(v) + eps)``, ``v`` the neuron's
running mean of ``g ** 2`` (the optimizer's ``beta2``, bias-corrected by the neuron's own count of
steps), at ``sink_lr_scale`` times the optimizer's learning rate; untouched neurons do not move; every
sink then takes the optimizer's decoupled weight decay at that rate.

The rule steps the sinks stored apart from the general neurons (:mod:`hf_memsinks.layers.sink_parts`),
parameters of their own, which patching with this setting gives every projection (the general
neurons stay trainable, with the optimizer's own state: a full fine-tune) and which
:func:`hf_memsinks.train_sinks` keeps trainable under an adapter: before the optimizer's step it
moves them and takes their gradient away, so the optimizer skips them and never allocates their
state. ``v`` and the count live in the optimizer's state of each such parameter (``rowwise_sq``,
``rowwise_count``, and ``step``, the rule's steps, which torch's Adam expects in any state it
loads), which checkpoints save with it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import sink_parts, touched_rows
from ..layers.neurons import neuron_rows
from ..layers.projections import is_patched_projection
from ..layers.touched_rows import TouchedRowsGrad


def rowwise_update(grad: torch.Tensor, dim: int, sq: torch.Tensor, count: torch.Tensor, beta2: float,
                   eps: float) -> torch.Tensor:
    """The rule's update for ``grad`` (neurons along ``dim``): ``g / (sqrt(v) + eps)`` on the touched
    neurons, zero on the others. Updates ``sq`` (each neuron's running mean of ``g ** 2``) and
    ``count`` (its steps) in place, for the touched neurons only."""
    n = grad.shape[dim]
    rows = grad.float().pow(2).movedim(dim, 0).reshape(n, -1).mean(1)  # one neuron per row
    touched = rows > 0
    count.add_(touched.to(count.dtype))
    sq.copy_(torch.where(touched, beta2 * sq + (1 - beta2) * rows, sq))
    denom = (sq / (1 - beta2 ** count.clamp_min(1))).sqrt_().add_(eps)
    return grad / denom.view([n if d == dim else 1 for d in range(grad.dim())]).to(grad.dtype)


def touched_update(index: torch.Tensor, grads: torch.Tensor, sq: torch.Tensor, count: torch.Tensor, beta2: float,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rowwise_update` of a gradient given as rows ``index`` (each once) and their gradient
    ``grads`` (one neuron per row), every other row zero: ``(the touched rows, their update)``."""
    rows = grads.float().pow(2).mean(1)
    touched = rows > 0  # (a row whose gradient is zero: its update is zero and its state stays)
    steps = count.index_select(0, index) + touched.to(count.dtype)
    old = sq.index_select(0, index)
    means = torch.where(touched, beta2 * old + (1 - beta2) * rows, old)
    count.index_copy_(0, index, steps)
    sq.index_copy_(0, index, means)
    denom = (means / (1 - beta2 ** steps.clamp_min(1))).sqrt_().add_(eps)
    return index, grads / denom.unsqueeze(1).to(grads.dtype)


class RowwiseSinks:
    """The rule, as an optimizer pre-hook over every trainable sink parameter of ``model`` (sinks stored apart)."""

    def __init__(self, model: nn.Module, scale: float, eps: float = 1e-8):
        self.scale, self.eps = float(scale), eps
        self.sinks = [(part, m.neuron_dims()[name]) for m in model.modules() if is_patched_projection(m)
                      for name, part in sink_parts.parts(m).items() if part.requires_grad]
        if not self.sinks:
            raise ValueError(
                "MemSinkConfig(sink_optimizer='rowwise') steps sinks stored apart, parameters of their own, "
                "and this model has none that train: patch it with that config (get_memsink_model sets them "
                "apart), and under an adapter call hf_memsinks.train_sinks(model) after peft.get_peft_model")
        if any(hasattr(p, "full_tensor") for p, _ in self.sinks):
            raise ValueError("MemSinkConfig(sink_optimizer='rowwise') does not step sharded sinks (FSDP) yet: its "
                             "per-neuron state is not sharded with them. Use sink_optimizer='adamw' under FSDP")
        for part, dim in self.sinks:  # (the weights' gradient: the rows a step touched, not a dense tensor;
            if part.dim() == 2:       # a bias's is one value a neuron, made whole by the gathered projection)
                touched_rows.keep_touched_rows(part, dim)

    @torch.no_grad()
    def before(self, optimizer: torch.optim.Optimizer, *_) -> None:
        # (the groups looked up at every step: loading a state dict, as accelerate's prepare does,
        # makes new group dicts, and only those follow the schedule's learning rate)
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for part, dim in self.sinks:
            group, grad = groups.get(id(part)), part.grad
            if grad is None or group is None:
                continue
            n = part.shape[dim]
            state = optimizer.state[part]
            state["step"] = state.get("step", torch.tensor(0.0)) + 1
            sq = state.setdefault("rowwise_sq", torch.zeros(n, device=part.device))
            count = state.setdefault("rowwise_count", torch.zeros(n, device=part.device))
            beta2 = group.get("betas", (0.9, 0.999))[1]
            lr = float(group["lr"]) * self.scale
            if isinstance(grad, TouchedRowsGrad) and grad.full is None:  # (the touched rows only)
                rows = grad.rows()
                if rows is not None:
                    index, update = touched_update(*rows, sq, count, beta2, self.eps)
                    neuron_rows(part, dim).index_add_(0, index, update, alpha=-lr)
            else:
                dense = grad.dense() if isinstance(grad, TouchedRowsGrad) else grad
                part.sub_(rowwise_update(dense, dim, sq, count, beta2, self.eps), alpha=lr)
            decay = float(group.get("weight_decay", 0.0))
            if decay:
                part.mul_(1 - lr * decay)
            part.grad = None
