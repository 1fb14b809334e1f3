"""``train.sink_optimizer`` (``rowwise``, ``sign``, ``momentum``, ``lazy``), an experiment: the sinks
step by another rule than AdamW's, to learn what a cheaper sink optimizer would cost in isolation
(docs/performance.md, "What the memory target needs").

AdamW keeps, for every sink weight, the weight, its gradient and two moments: 16 bytes in fp32,
which is what keeps ``for_finetuning()`` above 1.15x a full fine-tune's memory. Here, before
AdamW's step, the sinks take the rule's step (``lr * sink_lr_scale`` times the update below) and
their gradients are zeroed, so AdamW's moments for them stay zero and its step moves them by the
weight decay alone (scaled by the sink-LR hook, as in the AdamW runs). ``g`` is a sink's gradient;
a row is one sink neuron; a touched row has a nonzero gradient.

* ``rowwise``: touched rows move by ``g / (sqrt(v) + eps)``, ``v`` the row's running mean of ``g ** 2``
  (AdamW's beta2, bias-corrected by the row's own count of steps). No momentum, one value per neuron.
* ``sign``: touched weights move by ``sign(g)``. No state.
* ``momentum``: Adam with one second moment per neuron: a momentum per weight (AdamW's beta1), every
  row moved at every step, both moments bias-corrected by the step count.
* ``lazy``: Adam's own two moments per weight, but only touched rows update their moments and move
  (bias-corrected by the row's own count), as an optimizer that keeps only touched rows' gradients
  would run; untouched rows wait (AdamW moves them by their momentum at every step).
"""

from __future__ import annotations

import torch

from hf_memsinks.layers.projections import trainable_neuron_tensors

KINDS = ("rowwise", "sign", "momentum", "lazy")


class SinkStep:
    def __init__(self, model, optimizer: torch.optim.Optimizer, scale: float, kind: str, eps: float = 1e-8):
        if kind not in KINDS:
            raise ValueError(f"sink step {kind!r}: one of {KINDS}")
        self.scale, self.kind, self.eps, self.steps = float(scale), kind, eps, 0
        self.groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.targets = [(param, dim, start, n) for param, dim, spans in trainable_neuron_tensors(model, "sink")
                        for start, n in spans]
        per_weight = kind in ("momentum", "lazy")
        self.first = [torch.zeros_like(p.narrow(d, s, n)) if per_weight else None for p, d, s, n in self.targets]
        self.second = [torch.zeros_like(p.narrow(d, s, n)) if kind == "lazy" else torch.zeros(n, device=p.device)
                       for p, d, s, n in self.targets]
        self.count = [torch.zeros(n, device=p.device) for p, _, _, n in self.targets]

    @torch.no_grad()
    def before(self, *_) -> None:
        self.steps += 1
        for i, (param, dim, start, n) in enumerate(self.targets):
            if param.grad is None:
                continue
            grad = param.grad.narrow(dim, start, n)
            group = self.groups[id(param)]
            beta1, beta2 = group["betas"]
            shape = [n if d == dim else 1 for d in range(grad.dim())]
            rows = grad.float().pow(2).movedim(dim, 0).reshape(n, -1)  # one neuron per row
            touched = rows.amax(1) > 0
            self.count[i].add_(touched.float())
            lr = group["lr"] * self.scale
            if self.kind == "sign":
                update = grad.sign()
            elif self.kind == "rowwise":
                second = self.second[i]
                second.copy_(torch.where(touched, beta2 * second + (1 - beta2) * rows.mean(1), second))
                denom = (second / (1 - beta2 ** self.count[i].clamp_min(1))).sqrt_().add_(self.eps)
                update = grad / denom.view(shape).to(grad.dtype)  # (untouched rows: zero)
            elif self.kind == "momentum":
                first, second = self.first[i], self.second[i]
                first.lerp_(grad, 1 - beta1)
                second.mul_(beta2).add_(rows.mean(1), alpha=1 - beta2)
                denom = (second / (1 - beta2 ** self.steps)).sqrt_().add_(self.eps)
                update = first / denom.view(shape).to(first.dtype) / (1 - beta1 ** self.steps)
            else:  # lazy
                first, second, mask = self.first[i], self.second[i], touched.view(shape)
                first.copy_(torch.where(mask, beta1 * first + (1 - beta1) * grad, first))
                second.copy_(torch.where(mask, beta2 * second + (1 - beta2) * grad * grad, second))
                count = self.count[i].clamp_min(1).view(shape)
                update = (first / (1 - beta1 ** count)) / ((second / (1 - beta2 ** count)).sqrt() + self.eps)
                update = torch.where(mask, update, torch.zeros_like(update))
            param.narrow(dim, start, n).sub_(update, alpha=lr)
            grad.zero_()


def attach_sink_step(model, optimizer: torch.optim.Optimizer, kind: str) -> SinkStep:
    """Before each step of ``optimizer`` (registered after the sink-LR hook, which then scales only
    the sinks' weight decay)."""
    step = SinkStep(model, optimizer, model.memsink.config.sink_lr_scale, kind)
    optimizer.register_step_pre_hook(step.before)
    return step
