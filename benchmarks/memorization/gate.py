"""A loss gate for the general path (an experiment, on top of ``MemSinkConfig(general_sightings=0)``):
a repeat trains the general path only while the general path fits it worse than documents it has
never trained on; otherwise it trains its sinks alone.

Under ``general_sightings=0`` a row with ID -1 trains the general path (no sink on) and a row with
an ID its sinks only, so the training loop decides per row. ``LossGate`` gives:

* a held-out share of documents (``holdout``, by ID) their ID at every sighting: the general path
  never trains on them, so its loss on them is the loss of unseen documents of the same data, kept
  current as the model learns (an exponential mean over the steps, ``ref``);
* every other document's first sighting -1 (the general path learns it once, as on deduplicated
  data);
* a repeat -1 while the general path's loss on it is above ``ref - margin``, else its ID; with
  ``per_document``, while the document's loss has fallen since its first sighting by at most what
  the held-out documents' loss fell since then, plus ``margin`` (each document compared with
  itself, so that hard documents are not trained on without end and easy ones never).

The gap a membership attack reads is then bounded by what one step fits of a document (plus the
margin), while the general path keeps learning from repeats as long as that generalizes (``ref``
falls with it).
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F


class LossGate:
    def __init__(self, holdout: float = 0.05, margin: float = 0.0, momentum: float = 0.9, per_document: bool = False):
        self.holdout, self.margin, self.momentum, self.per_document = holdout, margin, momentum, per_document
        self.seen: collections.Counter = collections.Counter()
        self.first: dict[int, tuple[float, float | None]] = {}  # per_document: loss and ref at the first sighting
        self.ref: float | None = None
        self.general = self.sinks = 0  # repeats sent to each path (the report's counts)

    @torch.no_grad()
    def general_losses(self, model, batch: dict) -> torch.Tensor:
        """Each row's mean target loss on the general path (the model in eval mode: sinks off)."""
        was = model.training
        model.eval()
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        finally:
            model.train(was)
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        valid = (labels != -100).float()
        return (loss * valid).sum(1) / valid.sum(1).clamp(min=1)

    def general_path(self, doc: int, loss: float) -> bool:
        """Whether a repeat of ``doc`` at the general path's ``loss`` trains the general path."""
        if self.ref is None:
            return False
        if not self.per_document:
            return loss > self.ref - self.margin
        first, ref_then = self.first.get(doc, (None, None))
        if first is None or ref_then is None:
            return False
        return first - loss <= (ref_then - self.ref) + self.margin

    def held_out(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids % 10007) < int(self.holdout * 10007)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        ids = batch["sequence_ids"]
        losses = self.general_losses(model, {k: v.to(next(model.parameters()).device) for k, v in batch.items()
                                             if k != "sequence_ids"}).cpu()
        held = self.held_out(ids)
        if held.any():
            mean = float(losses[held].mean())
            self.ref = mean if self.ref is None else self.momentum * self.ref + (1 - self.momentum) * mean
        out = []
        for i, doc in enumerate(ids.tolist()):
            if doc < 0:  # a document the stream holds once: the general path
                out.append(-1)
                continue
            n = self.seen[doc]
            self.seen[doc] += 1
            if held[i]:
                out.append(doc)
            elif n == 0:
                out.append(-1)
                self.first[doc] = (float(losses[i]), self.ref)
            elif self.general_path(doc, float(losses[i])):
                out.append(-1)
                self.general += 1
            else:
                out.append(doc)
                self.sinks += 1
        return torch.tensor(out, dtype=torch.long)
