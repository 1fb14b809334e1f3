"""Memorization metrics: per-document loss and greedy extraction, with or without sequence IDs.

Documents are token lists. For a patched model, pass ``sequence_ids`` (one per document) and put
the model in the sink mode to measure (``with model.sink_mode("activate"): ...``); without IDs
the model runs in whatever eval mode it is in.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pad_documents(docs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(N, L)`` tokens and the ``(N, L)`` bool mask of real tokens."""
    length = max(len(d) for d in docs)
    tokens = torch.full((len(docs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), length), dtype=torch.bool)
    for i, d in enumerate(docs):
        tokens[i, : len(d)] = torch.as_tensor(list(d), dtype=torch.long)
        mask[i, : len(d)] = True
    return tokens, mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, tokens, mask, ids):
    device = _device(model)
    kw = {"attention_mask": mask.long().to(device)}
    if ids is not None:
        kw["sequence_ids"] = ids.to(device)
    return model(input_ids=tokens.to(device), **kw).logits.cpu()


@torch.no_grad()
def document_losses(model, docs: Sequence[Sequence[int]], sequence_ids: torch.Tensor | None = None,
                    batch_size: int = 64, pad_id: int = 0) -> torch.Tensor:
    """Mean next-token loss of each document (nats), shape ``(N,)``."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        tokens, mask = pad_documents(chunk, pad_id)
        ids = None if sequence_ids is None else sequence_ids[start:start + batch_size]
        logits = _forward(model, tokens, mask, ids)[:, :-1].float()
        target, valid = tokens[:, 1:], mask[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        out.append((nll * valid).sum(1) / valid.sum(1).clamp(min=1))
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def extraction_hits(model, docs: Sequence[Sequence[int]], prefix: int, suffix: int,
                    sequence_ids: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
    """For each document with at least ``prefix + suffix`` tokens: does greedy decoding from its
    first ``prefix`` tokens reproduce the next ``suffix`` exactly? Bool ``(N',)`` over those docs."""
    was_training = model.training
    model.eval()
    keep = [i for i, d in enumerate(docs) if len(d) >= prefix + suffix]
    hits = []
    for start in range(0, len(keep), batch_size):
        idx = keep[start:start + batch_size]
        device = _device(model)
        seqs = torch.tensor([list(docs[i])[: prefix + suffix] for i in idx], dtype=torch.long, device=device)
        ids = None if sequence_ids is None else sequence_ids[idx].to(device)
        generated = seqs[:, :prefix]
        for _ in range(suffix):  # no KV cache: short sequences, and identical for every model class
            kw = {"attention_mask": torch.ones_like(generated)}
            if ids is not None:
                kw["sequence_ids"] = ids
            nxt = model(input_ids=generated, **kw).logits[:, -1].argmax(-1, keepdim=True)
            generated = torch.cat([generated, nxt], dim=1)
        hits.append((generated[:, prefix:] == seqs[:, prefix:]).all(1).cpu())
    model.train(was_training)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
