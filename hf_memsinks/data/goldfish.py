"""Goldfish loss (Hans et al., NeurIPS 2024, "Be like a Goldfish, Don't Memorize!").

The forward pass is unchanged; a pseudo-random ``1/k`` of the target tokens is left out of the
loss (its label set to -100), chosen by a hash of the text around the target, so every
repetition of a passage drops the same tokens and no passage is ever fully supervised.

Which tokens are dropped. In Transformers' convention ``labels[b, t]`` is the target token
``input_ids[b, t]``, predicted from the tokens before it. Target ``t`` is hashed over the window
of the ``h`` tokens ending at it, ``input_ids[b, t-h+1 .. t]`` (what the published
``hash-table`` strategy does on its shifted targets), and dropped iff the hash falls under
``1/k``. A target with fewer than ``h`` targets before and including it in its document
(position in the document ``< h``, the document's first token counting as position 0 and never
being a target) is never dropped: the published code hashes full windows only. Positions come
from ``position_ids`` when the batch has them (packed rows: they restart at each document, so a
window never crosses into the previous document and a document gets the same drops wherever it
is packed), else from ``attention_mask`` (left or right padding), else the column index.

Two hashes, both int64 tensor ops vectorised over batch and positions (a loop over the ``h``
offsets of the window, none over tokens), identical in every process and on every device:

- ``"table"`` (default, the published scheme): the product of the window's token IDs (int64,
  wrapping) modulo ``TABLE_SIZE``, looked up in a table of ``torch.rand`` values drawn on the
  CPU from ``seed``. Our table is not the published run's table (same rule, other random
  values). Its known flaws are those of a product: it ignores the order of the window, and a
  window that holds token 0, or whose product collects 64 factors of two, wraps to 0, so all
  such windows share one decision (uniform tokens from a 50k vocabulary: 0.04% of windows at
  h = 13, 8% at h = 50, where the drop rate comes out at 0.88 / k).
- ``"mix"``: an order-sensitive splitmix64 chain over the window (as ``masks.py`` uses for
  sinks); drop iff the top 53 bits fall under ``2**53 / k``. No table, no collapse; use it for
  large ``h``.

Published settings: ``k=4, h=13`` (1B-parameter models in the paper); ``k=50, h=50`` in a
later production model. Goldfish leaves ``sequence_ids`` and every other batch field alone, so
it combines with sinks: ``GoldfishCollator(MemSinkDataCollator(tokenizer), k=4, h=13)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..ids.masks import GOLDEN, mix64, shift_right

IGNORE_INDEX = -100
TABLE_SIZE = 1_000_003  # a prime
HASHES = ("table", "mix")


@functools.lru_cache(maxsize=8)
def _table(seed: int, device: str) -> torch.Tensor:
    values = torch.rand(TABLE_SIZE, generator=torch.Generator().manual_seed(int(seed)))  # always drawn on the CPU
    return values.to(device)


def check_goldfish(k: int, h: int, hash: str) -> None:
    """Refuse settings Goldfish cannot use, before any batch is built."""
    if int(k) != k or k < 2:
        raise ValueError(f"goldfish k must be an integer >= 2 (drop 1 target in k), got {k!r}")
    if int(h) != h or h < 1:
        raise ValueError(f"goldfish h (hash window in tokens) must be an integer >= 1, got {h!r}")
    if hash not in HASHES:
        raise ValueError(f"unknown goldfish hash {hash!r}; use one of {HASHES}")


def positions_in_document(input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T)`` position of each token inside its document (see the module docstring)."""
    if position_ids is not None:
        return position_ids.long().expand_as(input_ids)
    if attention_mask is not None:
        mask = attention_mask.long()
        return (mask.cumsum(-1) - 1).clamp(min=0) * mask - (1 - mask)  # padding: -1, never eligible
    return torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)


def goldfish_drop_mask(input_ids: torch.Tensor, k: int = 4, h: int = 13, *, hash: str = "table", seed: int = 0,
                       position_ids: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``(B, T)``: True where the target ``input_ids[:, t]`` is left out of the loss."""
    check_goldfish(k, h, hash)
    ids = input_ids.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    windows = F.pad(ids, (h - 1, 0), value=1).unfold(-1, h, 1)  # (B, T, h): tokens t-h+1 .. t, a view
    if hash == "table":
        index = torch.remainder(windows.prod(-1), TABLE_SIZE)  # int64 product wraps, as in the published code
        drop = _table(seed, str(ids.device))[index] < 1.0 / k
    else:
        z = torch.full_like(ids, int(seed)) * GOLDEN
        for i in range(h):
            z = mix64(z + (windows[..., i] + 1) * GOLDEN)
        drop = shift_right(z, 11) < int(2.0**53 / k)
    pos = positions_in_document(ids, position_ids, attention_mask)
    return (drop & (pos >= h)).reshape(input_ids.shape)


def goldfish_labels(input_ids: torch.Tensor, labels: torch.Tensor | None = None, k: int = 4, h: int = 13, *,
                    hash: str = "table", seed: int = 0, position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``labels`` (default: ``input_ids``, padding at -100) with the Goldfish-dropped targets set
    to -100. Labels already at -100 stay there; a new tensor is returned."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    drop = goldfish_drop_mask(input_ids, k, h, hash=hash, seed=seed, position_ids=position_ids,
                              attention_mask=attention_mask)
    return labels.masked_fill(drop.to(labels.device), IGNORE_INDEX)


@dataclass
class GoldfishCollator:
    """Wraps any collator that returns ``input_ids`` (and ``labels``): the same batch with the
    Goldfish-dropped targets' labels at -100. Every other field (``sequence_ids``,
    ``position_ids``, ``attention_mask``) passes through unchanged.

    ``GoldfishCollator(MemSinkDataCollator(tokenizer), k=4, h=13)`` trains MemSinks with the
    Goldfish loss; ``GoldfishCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))``
    is Goldfish alone.

    Args:
        collator: the collator to wrap.
        k: drop one target in ``k``.
        h: hash window in tokens, the target and the ``h - 1`` before it (the same text drops the
            same targets wherever it repeats).
        hash: ``"table"`` or ``"mix"`` (see the module docstring).
        seed: seeds the hash (the table's values, or the mix chain's start).
    """

    collator: Callable[[list], dict]
    k: int = 4
    h: int = 13
    hash: str = "table"
    seed: int = 0

    def __post_init__(self):
        check_goldfish(self.k, self.h, self.hash)

    def __call__(self, features: list[Any]) -> dict:
        batch = self.collator(features)
        if "input_ids" not in batch:
            raise KeyError("GoldfishCollator: the wrapped collator returned no 'input_ids'")
        batch["labels"] = goldfish_labels(batch["input_ids"], batch.get("labels"), self.k, self.h, hash=self.hash,
                                          seed=self.seed, position_ids=batch.get("position_ids"),
                                          attention_mask=batch.get("attention_mask"))
        return batch
