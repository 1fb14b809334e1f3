"""Sequence IDs for datasets, and collators that carry them into the model.

Every repetition of a document must get the same ID, on every rank and in every Python run, so
IDs are hashes (blake2b) of a metadata value or of the content, never Python's salted ``hash``.
IDs are non-negative int63; ``NO_SEQUENCE`` (-1) is reserved for padding (no sink active).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .ids import check_sequence_ids
from .masks import NO_SEQUENCE
from .near_duplicates import add_near_duplicate_ids

ID_COLUMN = "sequence_ids"


# ---- stable hashing ---------------------------------------------------------------------------------


def _digest_to_id(data: bytes) -> int:
    digest = hashlib.blake2b(data, digest_size=8, person=b"hf_memsinks").digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: non-negative int64, never -1


def _value_bytes(value: Any) -> bytes:
    """A canonical byte form: the type is part of it, so ``1`` and ``"1"`` differ."""
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return b"b" + bytes(value)
    if isinstance(value, (bool, np.bool_)):
        return b"o" + (b"1" if value else b"0")
    if isinstance(value, (int, np.integer)):
        return b"i" + str(int(value)).encode()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
        return b"t" + np.asarray(value, dtype=np.int64).tobytes()  # token lists: fast path
    try:
        return b"j" + json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except TypeError as err:
        raise TypeError(f"cannot derive a stable sequence ID from a value of type {type(value).__name__}") from err


def stable_id(value: Any) -> int:
    """The sequence ID of one metadata value or document (str, bytes, int, token list, JSON-able)."""
    if value is None:
        raise ValueError("cannot derive a sequence ID from None (null)")
    return _digest_to_id(_value_bytes(value))


def _ids_for(values: Sequence[Any], column: str, indices: Sequence[int]) -> list[int]:
    out = []
    for value, index in zip(values, indices):
        if value is None:
            raise ValueError(f"column {column!r} is null in row {index}: every row needs a value to derive its "
                             "sequence ID")
        out.append(stable_id(value))
    return out


# ---- datasets ---------------------------------------------------------------------------------------


def add_sequence_ids(dataset, by: str = "content", column: str | None = None, *, output_column: str = ID_COLUMN,
                     threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 5,
                     batch_size: int = 1000, num_proc: int | None = None, desc: str | None = None):
    """Return ``dataset`` with an ``output_column`` of sequence IDs (one int per row).

    Every repetition of a document must get the same ID, so IDs come from what repeats with it.
    Metadata and content IDs are a batched ``map`` (streams, parallel with ``num_proc``).

    Args:
        dataset: a ``datasets.Dataset``.
        by: ``"metadata"``: hash of ``column``'s value (URL, doc id, author: any hashable value),
            so rows that share it share sinks. ``"content"``: hash of the text (or token list) in
            ``column``, so exact repeats share an ID. ``"near_duplicates"``: MinHash LSH over word
            shingles (``datasketch``) with Jaccard ``threshold``; each cluster of near-duplicates
            takes the content ID of its first row, so lightly edited repeats share an ID. ``"ids"``:
            ``column`` already holds integer IDs (document numbers from your pipeline); they are
            validated (integers, ``>= 0`` or ``-1``; see :mod:`hf_memsinks.ids`) and copied to
            ``output_column`` (or only validated, when ``column == output_column``).
        column: the column to derive IDs from; for ``"content"`` and ``"near_duplicates"`` it
            defaults to ``"text"``, else ``"input_ids"``.
        output_column: the new column (``"sequence_ids"``, what the collators and the model read).
        threshold, num_perm, shingle_size: ``"near_duplicates"`` only: Jaccard similarity that
            makes two rows one document, MinHash permutations, words (or tokens) per shingle.
        batch_size, num_proc, desc: passed to ``dataset.map``.
    """
    from datasets import Dataset  # noqa: F401  (datasets is an optional dependency)

    names = list(dataset.column_names)
    map_args = dict(batched=True, batch_size=batch_size, with_indices=True, num_proc=num_proc)
    if by == "ids":
        return _validated_ids(dataset, column, output_column, map_args, desc)
    if output_column in names:
        raise ValueError(f"dataset already has a {output_column!r} column; pass output_column=... or remove it")
    column = _source_column(names, by, column)
    if by in ("metadata", "content"):
        def assign(batch, indices):
            return {output_column: _ids_for(batch[column], column, indices)}

        return dataset.map(assign, **map_args, desc=desc or f"sequence IDs from {column!r}")
    if by == "near_duplicates":
        return add_near_duplicate_ids(dataset, column, output_column, stable_id, threshold, num_perm, shingle_size,
                                      map_args, desc)
    raise ValueError(f"unknown by={by!r}; use 'metadata', 'content', 'near_duplicates' or 'ids'")


def _source_column(names: list[str], by: str, column: str | None) -> str:
    if column is None:
        if by == "metadata":
            raise ValueError("by='metadata' needs column=<the metadata column>")
        column = "text" if "text" in names else "input_ids" if "input_ids" in names else None
        if column is None:
            raise ValueError(f"no 'text' or 'input_ids' column to hash; name one with column=... (have {names})")
    if column not in names:
        raise ValueError(f"dataset has no column {column!r} (have {names})")
    return column


def _validated_ids(dataset, column: str | None, output_column: str, map_args: dict, desc: str | None):
    """``by="ids"``: the column's IDs checked row by row, copied to ``output_column``."""
    names = list(dataset.column_names)
    if column is None or column not in names:
        raise ValueError(f"by='ids' needs column=<a column of integer IDs> (have {names})")
    if output_column in names and output_column != column:
        raise ValueError(f"dataset already has a {output_column!r} column; pass output_column=... or remove it")

    def validate(batch, indices):
        values = batch[column]
        for value, index in zip(values, indices):
            check_sequence_ids(value, f"row {index} of column {column!r}")
        return {} if column == output_column else {output_column: values}

    return dataset.map(validate, **map_args, desc=desc or f"check sequence IDs in {column!r}")


# ---- collators --------------------------------------------------------------------------------------


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


def ids_for_documents(documents: Iterable[Any]) -> torch.Tensor:
    """Content IDs for an in-memory list of documents (texts or token lists), as a LongTensor."""
    return torch.tensor([stable_id(d) for d in documents], dtype=torch.long)
