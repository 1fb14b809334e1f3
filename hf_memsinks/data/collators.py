"""Collators that carry each example's sequence ID into the batch: padded rows
(:class:`MemSinkDataCollator`) or packed documents (:class:`MemSinkPackingCollator`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..ids.masks import NO_SEQUENCE
from ..ids.validation import check_sequence_ids
from .sequence_ids import ID_COLUMN


def _as_list(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)


def example_ids(feature: dict, index: int, id_column: str, length: int) -> int | list[int]:
    """Example ``index``'s validated ID: one int, or one per token (``length`` of them)."""
    if id_column not in feature:
        raise KeyError(
            f"example {index} in the batch has no {id_column!r}: add IDs with hf_memsinks.data.add_sequence_ids "
            f"(and keep the column: it is a forward argument of the patched model)"
        )
    ids = feature[id_column]
    if ids is None:
        raise ValueError(f"example {index} has a null {id_column!r}")
    checked = check_sequence_ids(ids, f"example {index}'s {id_column!r}")
    if checked.dim() == 0:
        return int(checked)
    if checked.dim() != 1:
        raise ValueError(f"example {index}'s {id_column!r} must be one ID or one per token, "
                         f"got shape {tuple(checked.shape)}")
    if len(checked) != length:
        raise ValueError(f"example {index} has {len(checked)} per-token sequence IDs for {length} tokens")
    return checked.tolist()


@dataclass
class MemSinkDataCollator:
    """Pads a batch for causal LM training and carries each example's sequence ID.

    IDs are one int per example (``(B,)``) or one per token (``(B, T)``; padding gets
    ``NO_SEQUENCE``). Labels are ``input_ids`` with padding set to -100 unless examples bring
    their own.

    Args:
        tokenizer: where ``pad_token_id`` comes from when it is not given (its pad, else its EOS).
        pad_token_id: the token that pads ``input_ids``.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        max_length: truncate longer examples to this many tokens.
        id_column: the examples' field holding their IDs (``"sequence_ids"``).
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    id_column: str = ID_COLUMN
    padding_side: str = "right"

    def _pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        if self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            if pad is not None:
                return pad
        return 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        tokens = [_as_list(f["input_ids"]) for f in features]
        ids = [example_ids(f, i, self.id_column, len(t)) for i, (f, t) in enumerate(zip(features, tokens))]
        rows = [t[: self.max_length] if self.max_length else t for t in tokens]
        per_token = [isinstance(i, list) for i in ids]
        if any(per_token) and not all(per_token):
            raise ValueError("a batch mixes per-example and per-token sequence IDs")
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self._pad_id()
        batch = len(rows)
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        seq = torch.full((batch, length), NO_SEQUENCE, dtype=torch.long) if all(per_token) else torch.tensor(ids)
        for b, (row, feature) in enumerate(zip(rows, features)):
            n = len(row)
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            attention[b, span] = 1
            if "labels" in feature and feature["labels"] is not None:
                labels[b, span] = torch.tensor(_as_list(feature["labels"])[:n], dtype=torch.long)
            else:
                labels[b, span] = input_ids[b, span]
            if all(per_token):
                seq[b, span] = torch.tensor(ids[b][:n], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "sequence_ids": seq}


@dataclass
class MemSinkPackingCollator:
    """Packs whole documents into rows of ``max_length`` tokens with per-token sequence IDs.

    Each row concatenates documents (a document longer than a row is split, every piece keeping
    its ID); ``position_ids`` restart at 0 at each document and no ``attention_mask`` is returned,
    which is how Transformers models that support packed sequences keep attention inside each
    document. Labels are -100 on padding and on each document's first token (never predict a
    document from the previous one). Row tails are padded with ``NO_SEQUENCE``.

    Args:
        max_length: tokens per row.
        pad_token_id: the token that pads row tails.
        id_column: the examples' field holding their IDs (``"sequence_ids"``).
    """

    max_length: int
    pad_token_id: int = 0
    id_column: str = ID_COLUMN

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2")
        pieces: list[tuple[list[int], list[int]]] = []  # (tokens, ids) per piece
        for i, f in enumerate(features):
            tokens = [int(t) for t in _as_list(f["input_ids"])]
            ids = example_ids(f, i, self.id_column, len(tokens))
            ids = ids if isinstance(ids, list) else [ids] * len(tokens)
            for start in range(0, len(tokens), self.max_length):
                pieces.append((tokens[start:start + self.max_length], ids[start:start + self.max_length]))
        rows: list[list[tuple[list[int], list[int]]]] = [[]]
        used = 0
        for piece in pieces:  # first fit in arrival order keeps it deterministic
            if used + len(piece[0]) > self.max_length:
                rows.append([])
                used = 0
            rows[-1].append(piece)
            used += len(piece[0])
        rows = [r for r in rows if r]
        n, length = len(rows), self.max_length
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        positions = torch.zeros((n, length), dtype=torch.long)
        seq = torch.full((n, length), NO_SEQUENCE, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for tokens, ids in row:
                k = len(tokens)
                input_ids[r, at:at + k] = torch.tensor(tokens)
                labels[r, at + 1:at + k] = torch.tensor(tokens[1:], dtype=torch.long)
                positions[r, at:at + k] = torch.arange(k)
                seq[r, at:at + k] = torch.tensor(ids)
                at += k
            positions[r, at:] = torch.arange(length - at)
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "sequence_ids": seq}
