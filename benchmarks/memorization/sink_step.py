"""``train.sink_optimizer`` (``rowwise``, ``sign``, ``momentum``), an experiment: the sinks step with
less optimizer state than Adam's two values per weight (docs/performance.md, "What the memory target
needs": none of the three keeps AdamW's isolation).

AdamW keeps, for every sink weight, the weight, its gradient and two moments: 16 bytes in fp32,
which is what keeps ``for_finetuning()`` above 1.15x a full fine-tune's memory. A sink optimizer
whose state is per neuron would leave the weight (and, with sinks stored apart, the gradients of the
rows a step touched). Does it keep the isolation? Here, before AdamW's step, each touched sink
neuron (a row with a nonzero gradient) moves by ``lr * sink_lr_scale * g / (sqrt(v) + eps)``, ``v``
that neuron's running mean of ``g ** 2`` (AdamW's beta2, bias-corrected by the neuron's own count of
steps), and its gradient is zeroed, so AdamW's moments for the sinks stay zero and its step moves
them by the weight decay alone (scaled by the sink-LR hook, as in the AdamW runs). No momentum: a
sparse gradient's Adam step keeps moving a sink for ~10 steps after its document, which this one
does not, so ``sink_lr_scale`` is to be swept. ``train.sink_optimizer: sign`` keeps no state at all:
each weight of a touched sink moves by ``lr * sink_lr_scale * sign(g)`` (Adam's first step on a fresh
gradient is about that, times ``(1 - beta1) / sqrt(1 - beta2)``). ``train.sink_optimizer: momentum``
is Adam with the per-neuron second moment: a momentum per weight (AdamW's beta1), every sink moved at
every step as Adam moves it, both moments bias-corrected by the step count.
"""

from __future__ import annotations

import torch

from hf_memsinks.layers.projections import trainable_neuron_tensors


class RowwiseSinkStep:
    def __init__(self, model, optimizer: torch.optim.Optimizer, scale: float, eps: float = 1e-8, sign: bool = False,
                 momentum: bool = False):
        self.scale, self.eps, self.sign, self.momentum = float(scale), eps, sign, momentum
        self.steps = 0
        self.groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.targets = [(param, dim, start, n) for param, dim, spans in trainable_neuron_tensors(model, "sink")
                        for start, n in spans]
        self.second = [torch.zeros(n, device=param.device) for param, _, _, n in self.targets]
        self.count = [torch.zeros(n, device=param.device) for param, _, _, n in self.targets]
        self.first = [torch.zeros_like(param.narrow(dim, start, n)) for param, dim, start, n in self.targets] \
            if momentum else None

    @torch.no_grad()
    def before(self, *_) -> None:
        self.steps += 1
        for i, ((param, dim, start, n), second, count) in enumerate(zip(self.targets, self.second, self.count)):
            if param.grad is None:
                continue
            grad = param.grad.narrow(dim, start, n)
            if self.momentum:
                self._adam_rowwise(param, dim, start, n, grad, second, self.first[i])
                continue
            if self.sign:
                param.narrow(dim, start, n).sub_(grad.sign(), alpha=self.groups[id(param)]["lr"] * self.scale)
                grad.zero_()
                continue
            squares = grad.float().pow(2).movedim(dim, 0).reshape(n, -1).mean(1)
            touched = squares > 0
            group = self.groups[id(param)]
            beta2 = group["betas"][1]
            count.add_(touched.float())
            second.copy_(torch.where(touched, beta2 * second + (1 - beta2) * squares, second))
            denom = (second / (1 - beta2 ** count.clamp_min(1))).sqrt_().add_(self.eps)
            shape = [n if d == dim else 1 for d in range(grad.dim())]
            param.narrow(dim, start, n).sub_(grad / denom.view(shape).to(grad.dtype),
                                             alpha=group["lr"] * self.scale)  # (untouched rows: zero)
            grad.zero_()


    def _adam_rowwise(self, param, dim, start, n, grad, second, first) -> None:
        group = self.groups[id(param)]
        beta1, beta2 = group["betas"]
        first.lerp_(grad, 1 - beta1)
        second.mul_(beta2).add_(grad.float().pow(2).movedim(dim, 0).reshape(n, -1).mean(1), alpha=1 - beta2)
        denom = (second / (1 - beta2 ** self.steps)).sqrt_().add_(self.eps)
        shape = [n if d == dim else 1 for d in range(grad.dim())]
        param.narrow(dim, start, n).sub_(first / denom.view(shape).to(first.dtype),
                                         alpha=group["lr"] * self.scale / (1 - beta1 ** self.steps))
        grad.zero_()


def attach_rowwise_sink_step(model, optimizer: torch.optim.Optimizer, sign: bool = False,
                             momentum: bool = False) -> RowwiseSinkStep:
    """Before each step of ``optimizer`` (registered after the sink-LR hook, which then scales only
    the sinks' weight decay)."""
    step = RowwiseSinkStep(model, optimizer, model.memsink.config.sink_lr_scale, sign=sign, momentum=momentum)
    optimizer.register_step_pre_hook(step.before)
    return step
