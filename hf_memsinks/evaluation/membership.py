"""Membership inference: can an attacker tell the training documents from unseen ones?

Four reference-free attacks, each a score per document (higher = "looks like a member"):

- ``loss``: minus the mean next-token loss (Yeom et al. 2018);
- ``zlib``: minus the loss divided by the zlib-compressed length of the text in bytes (Carlini et
  al. 2021), so that documents that are merely easy (repetitive, compressible) are not flagged;
- ``min_k``: Min-K% (Shi et al. 2024): the mean log-probability of the document's k% least likely
  tokens, where a memorized document has no surprising token left;
- ``min_k_plus_plus``: Min-K%++ (Zhang et al. 2024): the same over ``(log p(x_t) - mu_t) / sigma_t``,
  with mu and sigma the mean and standard deviation of log p under the model's own next-token
  distribution at t: a member's token is a local maximum of the likelihood, not just a likely token.

Each attack is summarized as the ROC AUC of members against non-members (Mann-Whitney U, ties
counted half): 0.5 = the attacker learns nothing, 1 = every member scores above every non-member.

The zlib attack needs a text per document: ``texts`` when given, else the tokens decoded by
``tokenizer``, else the token IDs written as decimal numbers (a byte form that compresses
repeated IDs as text would compress repeated words).
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

from .memorization import _forward, pad_documents

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


def _texts(docs, texts, tokenizer) -> list[str]:
    if texts is not None:
        if len(texts) != len(docs):
            raise ValueError(f"{len(texts)} texts for {len(docs)} documents")
        return list(texts)
    if tokenizer is not None:
        return tokenizer.batch_decode([list(d) for d in docs], skip_special_tokens=True)
    return [" ".join(str(t) for t in d) for d in docs]


def zlib_length(text: str) -> int:
    """Bytes of ``text`` (UTF-8) once zlib-compressed at the default level."""
    return len(zlib.compress(text.encode("utf-8")))


def _lowest_mean(values: torch.Tensor, valid: torch.Tensor, k: float) -> torch.Tensor:
    """Per row, the mean of the ``ceil(k * n)`` smallest valid values (n = the row's valid count)."""
    big = torch.finfo(values.dtype).max
    ordered = values.masked_fill(~valid, big).sort(dim=1).values
    take = (valid.sum(1).float() * k).ceil().clamp(min=1).long()
    keep = torch.arange(values.shape[1]).unsqueeze(0) < take.unsqueeze(1)
    return (ordered * keep).sum(1) / take


@torch.no_grad()
def token_statistics(model, docs: Sequence[Sequence[int]], sequence_ids: torch.Tensor | None = None,
                     batch_size: int = 64, pad_id: int = 0):
    """Per batch of documents: ``(log p(x_t), mu_t, sigma_t, valid)``, each ``(B, L-1)``, for the
    targets x_1 .. x_{L-1}; mu and sigma are the mean and std of log p under the model's own
    next-token distribution (Min-K%++'s normalizers)."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(docs), batch_size):
            tokens, mask = pad_documents(docs[start:start + batch_size], pad_id)
            ids = None if sequence_ids is None else sequence_ids[start:start + batch_size]
            logp = torch.log_softmax(_forward(model, tokens, mask, ids)[:, :-1].float(), dim=-1)
            target = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
            yield target, mu, sigma, mask[:, 1:]
    finally:
        model.train(was_training)


def membership_scores(model, docs: Sequence[Sequence[int]], *, sequence_ids: torch.Tensor | None = None,
                      texts: Sequence[str] | None = None, tokenizer=None, k: float = 0.2, batch_size: int = 64,
                      pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Every attack's score of each document, ``{attack: (N,)}``; higher = more member-like.
    For a patched model pass ``sequence_ids`` and set its sink mode, as for ``document_losses``."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    parts: dict[str, list[torch.Tensor]] = {"loss": [], "min_k": [], "min_k_plus_plus": []}
    for target, mu, sigma, valid in token_statistics(model, docs, sequence_ids, batch_size, pad_id):
        count = valid.sum(1).clamp(min=1)
        parts["loss"].append((target * valid).sum(1) / count)
        parts["min_k"].append(_lowest_mean(target, valid, k))
        parts["min_k_plus_plus"].append(_lowest_mean((target - mu) / sigma.clamp(min=1e-6), valid, k))
    scores = {name: torch.cat(values) for name, values in parts.items()}
    lengths = torch.tensor([zlib_length(t) for t in _texts(docs, texts, tokenizer)], dtype=torch.float32)
    scores["zlib"] = scores["loss"] / lengths  # minus (loss / zlib bytes): the mean log-likelihood per byte
    return {name: scores[name] for name in ATTACKS}


def roc_auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """P(a member scores above a non-member), ties counted half: the ROC AUC, from the
    Mann-Whitney U statistic with average ranks. NaN when either side is empty."""
    members, nonmembers = torch.as_tensor(members).double().flatten(), torch.as_tensor(nonmembers).double().flatten()
    m, n = members.numel(), nonmembers.numel()
    if m == 0 or n == 0:
        return float("nan")
    values = torch.cat([members, nonmembers])
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # values strictly smaller than each unique value
    ranks = (below + (counts + 1) / 2)[inverse]  # average 1-based ranks
    u = ranks[:m].sum().item() - m * (m + 1) / 2
    return u / (m * n)


def pooled_auc(groups: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The AUC over member/non-member pairs drawn within each group only (e.g. natural documents
    against natural controls, canaries against canary controls): the groups' AUCs weighted by
    their pair counts. Pooling across groups would compare a natural member with a random-token
    control and dilute the attack towards 0.5."""
    total = weight = 0.0
    for members, nonmembers in groups:
        pairs = len(members) * len(nonmembers)
        if pairs:
            total += roc_auc(members, nonmembers) * pairs
            weight += pairs
    return total / weight if weight else float("nan")


def membership_auc(model, members: Sequence[Sequence[int]], nonmembers: Sequence[Sequence[int]], *,
                   member_ids: torch.Tensor | None = None, nonmember_ids: torch.Tensor | None = None,
                   member_texts: Sequence[str] | None = None, nonmember_texts: Sequence[str] | None = None,
                   tokenizer=None, k: float = 0.2, batch_size: int = 64, pad_id: int = 0) -> dict[str, float]:
    """``{attack: ROC AUC}`` of ``members`` (documents trained on) against ``nonmembers``
    (documents of the same distribution never trained on)."""
    common = dict(tokenizer=tokenizer, k=k, batch_size=batch_size, pad_id=pad_id)
    inside = membership_scores(model, members, sequence_ids=member_ids, texts=member_texts, **common)
    outside = membership_scores(model, nonmembers, sequence_ids=nonmember_ids, texts=nonmember_texts, **common)
    return {name: roc_auc(inside[name], outside[name]) for name in ATTACKS}


def privleak(auc: float, auc_retrained: float) -> float:
    """MUSE's PrivLeak (Shi et al. 2024): ``(AUC - AUC_retrained) / AUC_retrained``, the membership
    AUC of the forget set against held-out documents relative to the model retrained without it.
    0 = as private as retraining; positive = under-unlearned (still detectable); negative =
    over-unlearned (the forget set now stands out by being *worse* than unseen data)."""
    if not math.isfinite(auc) or not math.isfinite(auc_retrained) or auc_retrained == 0:
        return float("nan")
    return (auc - auc_retrained) / auc_retrained


def auc_null_std(members: int, nonmembers: int) -> float:
    """Standard deviation of the AUC when members and non-members come from one distribution
    (no leak, no ties): sqrt((m + n + 1) / (12 m n)). A tolerance for "0.5 = no leak"."""
    return math.sqrt((members + nonmembers + 1) / (12 * members * nonmembers))
