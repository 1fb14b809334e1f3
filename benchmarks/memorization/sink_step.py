"""``train.sink_optimizer`` or a finetune run's ``sink_optimizer`` (one of :data:`KINDS`), an
experiment: the sinks step by another rule than AdamW's, to learn what a cheaper sink optimizer
would cost in isolation (docs/performance.md, "What the memory target needs").

AdamW keeps, for every sink weight, the weight, its gradient and two moments: 16 bytes in fp32,
which is what keeps ``for_finetuning()`` above 1.15x a full fine-tune's memory. Here, before
AdamW's step, the sinks take the rule's step (``lr * sink_lr_scale`` times the update below) and
their gradients are zeroed, so AdamW's moments for them stay zero and its step moves them by the
weight decay alone (scaled by the sink-LR hook, as in the AdamW runs). ``g`` is a sink's gradient;
a row is one sink neuron; a touched row has a nonzero gradient.

* ``rowwise``: touched rows move by ``g / (sqrt(v) + eps)``, ``v`` the row's running mean of ``g ** 2``
  (AdamW's beta2, bias-corrected by the row's own count of steps). No momentum, one value per neuron.
  The product's ``sink_optimizer="rowwise"`` (:mod:`hf_memsinks.integrations.rowwise_sinks`).
* ``rowwise_bf16``: ``rowwise`` with the sinks' weights rounded to bf16 after the rule's step (AdamW's
  weight decay then scales them in fp32: a relative change below bf16's precision, rounded at the
  next step).
* ``rowwise_b99``, ``rowwise_b90``: ``rowwise`` with the row's running mean at beta2 0.99 / 0.9 instead
  of the optimizer's (0.95 in the benchmark): a longer or a shorter memory of the row's gradients.
* ``factored``: ``rowwise`` with a second factor per column of a neuron's row (an input feature of an
  input projection, an output feature of the output projection): touched weights move by
  ``g / sqrt(v_row * c)``, ``c`` each column's running mean of ``g ** 2`` over the touched rows (beta2,
  at the steps that touched any), divided by the columns' mean: Adafactor's factored second moment
  (without its update clipping), one value a neuron and one a column.
* ``factored_half``: ``factored`` with ``c ** 0.5`` for ``c``: halfway between it and ``rowwise``.
* ``factored_in``, ``factored_out``: ``factored`` on the sinks of the input projections (up, gate) or
  of the output projection (down) only, ``rowwise`` on the others.
* ``factored_clip``, ``rowwise_clip``: ``factored`` / ``rowwise`` with each neuron's update scaled
  down to a root mean square of at most one, as Adafactor clips its update.
* ``rowwise_clip15``, ``rowwise_clip2``: ``rowwise_clip`` with the bound at 1.5 / 2: only the steps
  whose gradient jumps furthest above the neuron's running mean are cut.
* ``sign``: touched weights move by ``sign(g)``. No state.
* ``momentum``: Adam with one second moment per neuron: a momentum per weight (AdamW's beta1), every
  row moved at every step, both moments bias-corrected by the step count.
* ``lazy``: Adam's own two moments per weight, but only touched rows update their moments and move
  (bias-corrected by the row's own count), as an optimizer that keeps only touched rows' gradients
  would run; untouched rows wait (AdamW moves them by their momentum at every step).
* ``adam_fp32``: AdamW's own rule, every row at every step, moments in fp32: the control, which
  should close what AdamW's own step of the sinks closes.
* ``adam_8bit``: the same with both moments stored in 8 bits (:func:`quantize`: blocks of 256
  values scaled by their largest magnitude, each value the nearest of 256 levels spaced densely near
  the block's largest, as 8-bit optimizers store them), dequantized, updated and stored again at
  every step: 2 bytes per sink weight instead of 8.
* ``adam_8bit_rows``: ``adam_8bit`` with one block per neuron (its weights, scaled by their largest):
  a block of 256 values spans many neurons, and the few a step trained set its scale, so the
  decaying moments of the others round to zero.
* ``adam_8bit_bf16``: ``adam_8bit_rows`` with the sinks' weights rounded to bf16 after the rule's step,
  as ``rowwise_bf16``: about what sinks stored in bf16 would be (2 bytes per weight instead of 4).
* ``lowrank4``, ``lowrank16``: each sink's weights stay their starting value plus a low-rank change
  ``A @ B`` (LoRA on the sinks, :class:`LowRankSinks`): ``B`` fixed, random, ``r`` orthogonal rows of
  norm ``sqrt(d / r)`` (so a change of one in ``A`` moves the row as much as Adam's step of every
  weight would), ``A`` (``r`` values a neuron) trained by AdamW at the sinks' rate: the sinks would
  need no gradient or optimizer state of their own size.
"""

from __future__ import annotations

import torch

from hf_memsinks.integrations.rowwise_sinks import rowwise_update
from hf_memsinks.layers.projections import is_patched_projection, trainable_neuron_tensors

KINDS = ("rowwise", "rowwise_bf16", "rowwise_b99", "rowwise_b90", "rowwise_clip", "rowwise_clip15", "rowwise_clip2",
         "factored", "factored_half", "factored_in", "factored_out", "factored_clip", "sign", "momentum", "lazy",
         "adam_fp32", "adam_8bit", "adam_8bit_rows", "adam_8bit_bf16", "lowrank4", "lowrank16")
ROWWISE_BETA2 = {"rowwise_b99": 0.99, "rowwise_b90": 0.9}
CLIP = {"rowwise_clip": 1.0, "factored_clip": 1.0, "rowwise_clip15": 1.5, "rowwise_clip2": 2.0}
BLOCK = 256


def _levels(signed: bool) -> torch.Tensor:
    """The 8-bit code's levels in [-1, 1] (or [0, 1]): decade ``e`` (values 10^-e * [0.1, 1]) gets
    ``2 ** (bits - e)`` evenly spaced levels, so precision is finest near the block's largest value."""
    bits = 6 if signed else 7
    pos = [10.0 ** -e * (0.1 + 0.9 * (torch.arange(2 ** (bits - e)) + 0.5) / 2 ** (bits - e))
           for e in range(bits + 1)]
    pos = torch.cat(pos + [torch.zeros(1)])
    return torch.cat([-pos[pos > 0], pos]).sort().values if signed else pos.sort().values


_CODES = {True: _levels(True), False: _levels(False)}


def quantize(x: torch.Tensor, signed: bool, rows_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as 8-bit codes and one scale per block of :data:`BLOCK` values (``rows_dim`` given: one
    block per index along it, a neuron's weights)."""
    levels = _CODES[signed].to(x.device)
    if rows_dim is not None:
        blocks = x.movedim(rows_dim, 0).reshape(x.shape[rows_dim], -1).float()
    else:
        flat = x.reshape(-1).float()
        pad = (-flat.numel()) % BLOCK
        blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCK)
    scale = blocks.abs().amax(1, keepdim=True).clamp_min(1e-30)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize((blocks / scale).contiguous(), mids).to(torch.uint8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool, like: torch.Tensor,
               rows_dim: int | None = None) -> torch.Tensor:
    values = _CODES[signed].to(scale.device)[codes.long()] * scale
    if rows_dim is not None:
        shape = list(like.movedim(rows_dim, 0).shape)
        return values.view(shape).movedim(0, rows_dim).to(like.dtype)
    return values.reshape(-1)[: like.numel()].view(like.shape).to(like.dtype)


def _row_squares(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """``grad ** 2`` with one neuron per row."""
    return grad.float().pow(2).movedim(dim, 0).reshape(grad.shape[dim], -1)


def factored_update(grad: torch.Tensor, dim: int, sq: torch.Tensor, count: torch.Tensor, inputs: torch.Tensor,
                    beta2: float, eps: float, power: float = 1.0) -> torch.Tensor:
    """``factored`` (``power`` 0.5: ``factored_half``; 0: ``rowwise``): ``g / (sqrt(v_row * c ** power) +
    eps)`` on the touched neurons (along ``dim``); updates ``sq`` and ``count`` (the neurons') and
    ``inputs`` (each column's running mean of ``g ** 2`` over the touched neurons, on a step that
    touched any) in place."""
    squares = _row_squares(grad, dim)  # one neuron per row
    means = squares.mean(1)
    touched = means > 0
    count.add_(touched.to(count.dtype))
    sq.copy_(torch.where(touched, beta2 * sq + (1 - beta2) * means, sq))
    if bool(touched.any()):
        inputs.mul_(beta2).add_(squares[touched].mean(0), alpha=1 - beta2)
    row_v = sq / (1 - beta2 ** count.clamp_min(1))
    col_v = (inputs / inputs.mean().clamp_min(1e-30)).pow(power)
    moved = grad.float().movedim(dim, 0)
    update = moved.reshape(squares.shape) / (row_v.unsqueeze(1) * col_v.unsqueeze(0)).sqrt_().add_(eps)
    return update.view(moved.shape).movedim(0, dim).to(grad.dtype)


def sink_targets(model) -> list[tuple]:
    """``(parameter, neuron dim, start, count)`` of every sink span of the model's trainable tensors."""
    return [(param, dim, start, n) for param, dim, spans in trainable_neuron_tensors(model, "sink")
            for start, n in spans]


def sink_grads(optimizer: torch.optim.Optimizer, targets: list[tuple]):
    """``(index, the sink part of its gradient, its param group)`` of every target with a gradient.
    The groups are looked up at every step: accelerate's ``prepare`` loads the optimizer's state
    dict, which makes new group dicts, and only those follow the schedule's learning rate."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for i, (param, dim, start, n) in enumerate(targets):
        if param.grad is not None:
            yield i, param.grad.narrow(dim, start, n), groups[id(param)]


class SinkStep:
    def __init__(self, model, optimizer: torch.optim.Optimizer, scale: float, kind: str, eps: float = 1e-8):
        if kind not in KINDS:
            raise ValueError(f"sink step {kind!r}: one of {KINDS}")
        self.scale, self.kind, self.eps, self.steps = float(scale), kind, eps, 0
        self.optimizer = optimizer
        self.targets = sink_targets(model)
        per_weight = kind in ("momentum", "lazy", "adam_fp32")
        self.first = [torch.zeros_like(p.narrow(d, s, n)) if per_weight else None for p, d, s, n in self.targets]
        self.second = [torch.zeros_like(p.narrow(d, s, n)) if kind in ("lazy", "adam_fp32")
                       else torch.zeros(n, device=p.device) for p, d, s, n in self.targets]
        self.rows = kind in ("adam_8bit_rows", "adam_8bit_bf16")  # (one block per neuron)
        if kind.startswith("adam_8bit"):
            self.first = [quantize(torch.zeros_like(p.narrow(d, s, n)), True, d if self.rows else None)
                          for p, d, s, n in self.targets]
            self.second = [quantize(torch.zeros_like(p.narrow(d, s, n)), False, d if self.rows else None)
                           for p, d, s, n in self.targets]
        self.count = [torch.zeros(n, device=p.device) for p, _, _, n in self.targets]
        if kind.startswith("factored"):
            # the power of each target's column factor, by its projection's role (0: rowwise's step)
            roles = {id(p): m.memsink.role for m in model.modules() if is_patched_projection(m)
                     for p in m.parameters(recurse=False)}
            self.powers = [1.0 if kind in ("factored", "factored_clip", f"factored_{roles.get(id(p))}") else
                           0.5 if kind == "factored_half" else 0.0 for p, _, _, _ in self.targets]
            # each column's running mean of g ** 2 (divided by the columns' mean: no bias correction needed)
            self.cols = [torch.zeros(p.narrow(d, s, n).numel() // n, device=p.device) for p, d, s, n in self.targets]

    @torch.no_grad()
    def before(self, *_) -> None:
        self.steps += 1
        for i, grad, group in sink_grads(self.optimizer, self.targets):
            param, dim, start, n = self.targets[i]
            beta1, beta2 = group["betas"]
            shape = [n if d == dim else 1 for d in range(grad.dim())]
            lr = group["lr"] * self.scale
            if self.kind == "sign":
                update = grad.sign()
            elif self.kind in ROWWISE_BETA2:
                update = rowwise_update(grad, dim, self.second[i], self.count[i], ROWWISE_BETA2[self.kind], self.eps)
            elif self.kind.startswith("rowwise"):  # the product's rule (hf_memsinks.integrations.rowwise_sinks)
                update = rowwise_update(grad, dim, self.second[i], self.count[i], beta2, self.eps)
            elif self.kind.startswith("factored"):
                update = factored_update(grad, dim, self.second[i], self.count[i], self.cols[i], beta2, self.eps,
                                         self.powers[i])
            elif self.kind == "momentum":
                first, second = self.first[i], self.second[i]
                first.lerp_(grad, 1 - beta1)
                second.mul_(beta2).add_(_row_squares(grad, dim).mean(1), alpha=1 - beta2)
                denom = (second / (1 - beta2 ** self.steps)).sqrt_().add_(self.eps)
                update = first / denom.view(shape).to(first.dtype) / (1 - beta1 ** self.steps)
            elif self.kind.startswith("adam"):
                if self.kind == "adam_fp32":
                    first, second = self.first[i], self.second[i]
                else:
                    rows_dim = dim if self.rows else None
                    first = dequantize(*self.first[i], True, grad, rows_dim)
                    second = dequantize(*self.second[i], False, grad, rows_dim)
                first.lerp_(grad, 1 - beta1)
                second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (first / (1 - beta1 ** self.steps)) / (
                    (second / (1 - beta2 ** self.steps)).sqrt() + self.eps)
                if self.kind != "adam_fp32":
                    self.first[i] = quantize(first, True, rows_dim)
                    self.second[i] = quantize(second, False, rows_dim)
                # AdamW then decays the sinks (scaled by the sink-LR hook): divided here so that the
                # result is AdamW's own, decay before the update
                lr = lr / (1 - lr * group["weight_decay"])
            else:  # lazy
                touched = _row_squares(grad, dim).amax(1) > 0
                self.count[i].add_(touched.float())
                first, second, mask = self.first[i], self.second[i], touched.view(shape)
                first.copy_(torch.where(mask, beta1 * first + (1 - beta1) * grad, first))
                second.copy_(torch.where(mask, beta2 * second + (1 - beta2) * grad * grad, second))
                count = self.count[i].clamp_min(1).view(shape)
                update = (first / (1 - beta1 ** count)) / ((second / (1 - beta2 ** count)).sqrt() + self.eps)
                update = torch.where(mask, update, torch.zeros_like(update))
            if self.kind in CLIP:  # (each neuron's update at a root mean square of at most the kind's bound)
                rms = _row_squares(update, dim).mean(1).sqrt() / CLIP[self.kind]
                update = update / rms.clamp_min(1.0).view(shape).to(update.dtype)
            view = param.narrow(dim, start, n)
            view.sub_(update, alpha=lr)
            if self.kind.endswith("_bf16"):
                view.copy_(view.to(torch.bfloat16))
            grad.zero_()


class LowRankSinks:
    """``lowrank{r}``: before the optimizer's step, ``A`` takes AdamW's step on ``g @ B^T`` and the
    sinks' gradients are zeroed; after it (and after the sink-LR hook), every sink is set to its
    starting value plus ``A @ B``, which undoes the weight decay AdamW gave the sinks themselves
    (``A`` takes the decay instead)."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, scale: float, rank: int, eps: float = 1e-8):
        self.scale, self.eps, self.steps = float(scale), eps, 0
        self.optimizer = optimizer
        self.targets = sink_targets(model)
        generator = torch.Generator().manual_seed(0)
        self.start, self.a, self.b, self.first, self.second = [], [], [], [], []
        for param, dim, start, n in self.targets:
            rows = param.detach().narrow(dim, start, n).movedim(dim, 0).reshape(n, -1)  # one neuron per row
            d = rows.shape[1]
            q, _ = torch.linalg.qr(torch.randn(d, min(rank, d), generator=generator))
            self.start.append(rows.clone())
            self.b.append((q.t() * (d / q.shape[1]) ** 0.5).to(rows))
            self.a.append(rows.new_zeros(n, q.shape[1]))
            self.first.append(rows.new_zeros(n, q.shape[1]))
            self.second.append(rows.new_zeros(n, q.shape[1]))

    @torch.no_grad()
    def before(self, *_) -> None:
        self.steps += 1
        for i, grad, group in sink_grads(self.optimizer, self.targets):
            param, dim, start, n = self.targets[i]
            beta1, beta2 = group["betas"]
            g = grad.movedim(dim, 0).reshape(n, -1).float() @ self.b[i].t()
            self.first[i].lerp_(g, 1 - beta1)
            self.second[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            update = (self.first[i] / (1 - beta1 ** self.steps)) / (
                (self.second[i] / (1 - beta2 ** self.steps)).sqrt() + self.eps)
            lr = group["lr"] * self.scale
            self.a[i].mul_(1 - lr * group["weight_decay"]).sub_(update, alpha=lr)
            grad.zero_()

    @torch.no_grad()
    def after(self, *_) -> None:
        for i, (param, dim, start, n) in enumerate(self.targets):
            view = param.narrow(dim, start, n)
            rows = self.start[i] + self.a[i] @ self.b[i]
            shape = list(view.movedim(dim, 0).shape)
            view.copy_(rows.view(shape).movedim(0, dim))


def attach_sink_step(model, optimizer: torch.optim.Optimizer, kind: str):
    """Before each step of ``optimizer`` (registered after the sink-LR hook, which then scales only
    the sinks' weight decay)."""
    if kind.startswith("lowrank"):
        step = LowRankSinks(model, optimizer, model.memsink.config.sink_lr_scale, int(kind[len("lowrank"):]))
        optimizer.register_step_pre_hook(step.before)
        optimizer.register_step_post_hook(step.after)
        return step
    step = SinkStep(model, optimizer, model.memsink.config.sink_lr_scale, kind)
    optimizer.register_step_pre_hook(step.before)
    return step
