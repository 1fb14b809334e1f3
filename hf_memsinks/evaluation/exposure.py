"""Exposure of a planted secret (the "secret sharer" test, Carlini et al. 2019).

A canary is a sentence of a fixed format with a random secret in it, e.g. "the secret code of
Alice is 123456789." The model ranks every candidate secret of the format by the likelihood of
the whole sentence; exposure = log2(|candidates|) - log2(rank of the true secret): 0 bits = the
true secret is the least likely, log2(|candidates|) = the most likely (it can be read off the model).
A secret the model never saw has an expected exposure of about 1/ln 2 = 1.44 bits.

Estimators (``exposure``):

- exact, over every candidate, when the space holds at most ``max_exact`` of them;
- sampled otherwise: N candidates drawn uniformly from the space (the true secret excluded),
  rank fraction estimated as ``(c + 1) / (N + 1)`` with ``c`` the candidates at least as likely as
  the secret, exposure = ``-log2((c + 1) / (N + 1))``. It is capped at ``log2(N + 1)`` (the secret
  beats every sample), so a large N is needed to tell a leaked secret from a merely likely one.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from .memorization import document_losses

DEFAULT_FORMAT = "the secret code of {name} is {secret}."


def sequence_nll(model, docs: Sequence[Sequence[int]], sequence_ids: torch.Tensor | None = None,
                 batch_size: int = 64, pad_id: int = 0) -> torch.Tensor:
    """Total next-token loss of each document (nats): comparable across candidates of different
    token counts, unlike the mean."""
    means = document_losses(model, docs, sequence_ids, batch_size=batch_size, pad_id=pad_id)
    return means * torch.tensor([max(1, len(d) - 1) for d in docs], dtype=means.dtype)


def exposure_from_losses(secret_loss: float, candidate_losses: torch.Tensor, space: int | None = None) -> float:
    """Exposure of a secret with total loss ``secret_loss`` among ``candidate_losses`` (the other
    candidates). ``space`` None: the candidates are a uniform sample (the sampled estimator);
    else they are all ``space - 1`` other secrets (exact: rank = 1 + those at least as likely)."""
    at_least_as_likely = int((torch.as_tensor(candidate_losses) <= secret_loss).sum())
    if space is None:
        n = len(candidate_losses)
        return -math.log2((at_least_as_likely + 1) / (n + 1))
    return math.log2(space) - math.log2(1 + at_least_as_likely)


def candidate_secrets(secret: str, alphabet: str, count: int | None, seed: int) -> list[str]:
    """The other secrets of ``secret``'s length over ``alphabet``: all of them (``count`` None) or
    ``count`` drawn uniformly with replacement, never the secret itself."""
    length = len(secret)
    if count is None:
        out = []
        for i in range(len(alphabet) ** length):
            digits = []
            for _ in range(length):
                i, r = divmod(i, len(alphabet))
                digits.append(alphabet[r])
            candidate = "".join(reversed(digits))
            if candidate != secret:
                out.append(candidate)
        return out
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        candidate = "".join(rng.choice(alphabet) for _ in range(length))
        if candidate != secret:
            out.append(candidate)
    return out


def exposure(model, tokenizer, text: str, secret: str, *, alphabet: str = "0123456789", candidates: int = 1000,
             max_exact: int = 10_000, prefix_ids: Sequence[int] = (), sequence_id: int | None = None,
             seed: int = 0, batch_size: int = 128, pad_id: int = 0) -> dict:
    """Exposure of ``secret`` where it appears in ``text`` (the canary as trained): every
    candidate replaces it in the same sentence, each sentence is scored by its total loss.

    ``prefix_ids`` go before each encoded sentence (e.g. the BOS token training put there);
    ``sequence_id``: run every candidate with this ID (a patched model in ``"activate"`` mode,
    the canary's own sinks on). Returns ``exposure``, ``max_exposure`` (its cap), ``space``,
    ``candidates`` and ``exact``."""
    if secret not in text:
        raise ValueError(f"the secret {secret!r} does not appear in the canary text")
    if any(c not in alphabet for c in secret):
        raise ValueError(f"the secret {secret!r} has characters outside the alphabet {alphabet!r}")
    space = len(alphabet) ** len(secret)
    exact = space <= max_exact
    others = candidate_secrets(secret, alphabet, None if exact else candidates, seed)
    head, tail = text.split(secret, 1)

    def encode(s: str) -> list[int]:
        return list(prefix_ids) + tokenizer(head + s + tail, add_special_tokens=False)["input_ids"]

    docs = [encode(secret)] + [encode(c) for c in others]
    ids = None if sequence_id is None else torch.full((len(docs),), sequence_id, dtype=torch.long)
    losses = sequence_nll(model, docs, ids, batch_size=batch_size, pad_id=pad_id)
    value = exposure_from_losses(losses[0].item(), losses[1:], space if exact else None)
    cap = math.log2(space) if exact else math.log2(len(others) + 1)
    return {"exposure": value, "max_exposure": cap, "space": space, "candidates": len(others), "exact": exact}
