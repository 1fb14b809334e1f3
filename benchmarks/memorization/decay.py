"""A general path that takes less of each repeat (an experiment, on top of the default MemSinks
forward, ``general_sightings=None``): a document's sighting ``n`` gives the general path a weight
``w`` of its gradient, while the row's sinks take all of it.

The training loss of a batch is

    sum_i  w_i * loss_i(the model's forward: general path + row i's sinks)
         + (1 - w_i) * loss_i(the same forward with the general path frozen: row i's sinks only)

The two forwards compute the same logits (the same parameter values), so the sinks' gradient is
the full one, the general path's ``w_i`` of row i's. ``w_i = 1`` is the default row (only the first
forward runs); ``w_i = 0`` is what ``general_sightings`` gives a later sighting (the frozen forward
is the library's, :func:`hf_memsinks.sightings.routing.frozen_general`, built here without the
routing state). ``w_i``:

* ``schedule``: ``inverse`` (1/n), ``inverse_sqrt`` (1/sqrt(n)) or ``halving`` (0.5^(n-1)) of the
  sighting ``n`` (1 for the first; rows seen once keep 1);
* ``clip``: DP-SGD's per-example clipping on repeats: ``min(1, C / ||g_i||)``, ``g_i`` the exact
  gradient of row i's mean token loss with respect to every general parameter (the patched
  projections' general slices and every parameter without sinks), computed one row at a time (a
  backward per repeat: the 4 x 128 model makes that cheap); with ``schedule`` too, the smaller
  weight. First sightings are not clipped.

``alone``: the general path's share runs with no sink on (the row's ID -1), as ``general_sightings``
trains a first sighting, so that the general path learns to do without the sinks it will lose: ``w_i
= 1`` is then standard training of that row, ``w_i = 0`` its sinks alone.

AdamW divides each parameter's step by the root of its mean squared gradient, so a weight shared
by a whole batch (every row of an epoch is the same sighting in the epochs setting) is largely
divided out again within a few dozen steps, leaving mostly a reweighting of rows. ``lr``
makes the weight a learning rate: the general path's step (its parameter change, weight decay
included) is also multiplied by the batch's mean weight (per target token), by an optimizer hook
like the library's ``SinkLR``. Counts are per row of the global batch: one process only.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F
from torch.nn.utils.stateless import _reparametrize_module

from hf_memsinks.layers.projections import trainable_neuron_tensors
from hf_memsinks.sightings.routing import sink_gradient_only, sink_masks

from .training import loss_sum

SCHEDULES = {
    "inverse": lambda n: 1.0 / n,
    "inverse_sqrt": lambda n: 1.0 / math.sqrt(n),
    "halving": lambda n: 0.5 ** (n - 1),
}


def row_losses(model, batch: dict) -> torch.Tensor:
    """Each row's next-token cross-entropy summed over its target tokens (labels != -100)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   sequence_ids=batch["sequence_ids"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return loss.sum(1)


class GeneralShare:
    def __init__(self, schedule: str | None = None, clip: float | None = None, lr: bool = False,
                 alone: bool = False):
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"decay.schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if clip is not None and not float(clip) > 0:
            raise ValueError(f"decay.clip must be > 0, got {clip}")
        if schedule is None and clip is None:
            raise ValueError("decay needs a schedule or a clip")
        self.schedule, self.clip, self.lr = schedule, None if clip is None else float(clip), lr
        self.alone = alone
        self.seen: collections.Counter = collections.Counter()
        self.masks: dict[int, torch.Tensor] | None = None
        self.step_weight = 1.0  # the last batch's mean weight per target token (the lr hook's factor)
        self.repeats = self.clipped = 0
        self.repeat_weight = 0.0  # sum of the repeats' weights (the report's mean)
        self.norms: list[float] = []  # clip: the repeats' general gradient norms (the report's quantiles)
        self._saved: list[torch.Tensor] = []

    # ---- the weights ----------------------------------------------------------------------------------

    def sightings(self, ids: torch.Tensor) -> list[int]:
        """Each row's sighting number (1 for the first), counted; 1 for a row without an ID (-1)."""
        out = []
        for doc in ids.tolist():
            if doc < 0:
                out.append(1)
                continue
            self.seen[doc] += 1
            out.append(self.seen[doc])
        return out

    def general_norms(self, model, batch: dict, rows: list[int]) -> dict[int, float]:
        """The norm of the gradient of each of ``rows``' mean token loss over the general parameters,
        one row at a time (the general path's forward: with the row's sinks, or none with ``alone``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        out = {}
        for i in rows:
            one = self._general({k: v[i:i + 1] for k, v in batch.items()})
            targets = (one["labels"][:, 1:] != -100).sum().clamp(min=1)
            grads = torch.autograd.grad(row_losses(model, one).sum() / targets, params, allow_unused=True)
            total = 0.0
            for p, g in zip(params, grads):
                if g is None:
                    continue
                mask = self.masks.get(id(p))
                total += float((g.masked_fill(mask, 0.0) if mask is not None else g).pow(2).sum())
            out[i] = math.sqrt(total)
        return out

    def weights(self, model, batch: dict) -> torch.Tensor:
        """Each row's general weight ``w_i`` (counts the batch's sightings)."""
        n = self.sightings(batch["sequence_ids"])
        w = [1.0] * len(n)
        repeats = [i for i, k in enumerate(n) if k > 1]
        if self.schedule is not None:
            for i in repeats:
                w[i] = SCHEDULES[self.schedule](n[i])
        if self.clip is not None and repeats:
            norms = self.general_norms(model, batch, repeats)
            for i, norm in norms.items():
                self.norms.append(norm)
                if norm > self.clip:
                    self.clipped += 1
                    w[i] = min(w[i], self.clip / norm)
        self.repeats += len(repeats)
        self.repeat_weight += sum(w[i] for i in repeats)
        return torch.tensor(w)

    # ---- the loss -------------------------------------------------------------------------------------

    def _general(self, batch: dict) -> dict:
        """The batch of the general path's forward: as given, or with ``alone`` without IDs (no sink on)."""
        if not self.alone:
            return batch
        return {**batch, "sequence_ids": torch.full_like(batch["sequence_ids"], -1)}

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The batch's training loss, summed over its target tokens (the training loop's ``loss_sum``):
        each row's loss at weight ``w_i`` through the default forward, and at ``1 - w_i`` with the
        general path frozen."""
        if self.masks is None:
            self.masks = sink_masks(model)
        w = self.weights(model, batch).to(batch["input_ids"].device)
        targets = (batch["labels"][:, 1:] != -100).sum(1).float()
        self.step_weight = float((w * targets).sum() / targets.sum().clamp(min=1))
        if bool((w == 1).all()):
            return loss_sum(model, self._general(batch))  # the default row's loss itself
        total = batch["input_ids"].new_zeros((), dtype=torch.float32)
        a, b = (w > 0).nonzero().squeeze(1), (w < 1).nonzero().squeeze(1)
        if a.numel():
            total = total + (w[a] * row_losses(model, self._general({k: v[a] for k, v in batch.items()}))).sum()
        if b.numel():
            with _reparametrize_module(model, sink_gradient_only(model, self.masks), tie_weights=True):
                frozen = row_losses(model, {k: v[b] for k, v in batch.items()})
            total = total + ((1 - w[b]) * frozen).sum()
        return total

    # ---- lr: the general path's step times the batch's weight -----------------------------------------

    def attach(self, model, optimizer) -> None:
        """With ``lr``: hooks on ``optimizer`` that scale the general path's step by ``step_weight``."""
        if not self.lr:
            return
        mixed = trainable_neuron_tensors(model, "general")
        ids = {id(p) for p, _, _ in mixed}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        views = [(p, dim, s, n) for p, dim, spans in mixed for s, n in spans]

        def current() -> list[torch.Tensor]:
            return [p.narrow(dim, s, n) for p, dim, s, n in views] + others

        @torch.no_grad()
        def before(*_):
            self._saved = [v.clone() for v in current()] if self.step_weight < 1 else []

        @torch.no_grad()
        def after(*_):
            for view, old in zip(current(), self._saved):
                torch.lerp(old, view, self.step_weight, out=view)
            self._saved = []

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)

    def report(self) -> dict:
        out = {"repeats": self.repeats, "repeat_mean_weight": self.repeat_weight / max(1, self.repeats)}
        if self.clip is not None:
            out["clipped"] = self.clipped
            if self.norms:
                q = torch.tensor(self.norms).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
                out["repeat_norm_quantiles"] = q
        return out
