"""Sequence IDs for datasets: every repetition of a document gets the same ID.

The same ID on every rank and in every Python run, so IDs are hashes (blake2b,
:func:`hf_memsinks.ids.content_hash.content_id`, the hash ``general_sightings`` counts contents by)
of a metadata value or of the content, never Python's salted ``hash``. IDs are non-negative int63;
``NO_SEQUENCE`` (-1) is reserved for padding (no sink active).

An unkeyed ID is a public function of the document: whoever can guess a text or a URL can hash
it and check whether it is among the IDs in a forget list, a log or a card. With a secret ``key``
(blake2b's keyed mode, 16 to 64 bytes) the IDs are as stable, but only the key's holder can link
them to documents. Unkeyed IDs are unchanged by the option.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..ids.content_hash import content_id, token_bytes
from ..ids.validation import check_sequence_ids
from .near_duplicates import add_near_duplicate_ids

ID_COLUMN = "sequence_ids"

# ---- stable hashing ---------------------------------------------------------------------------------


Key = str | bytes | None


def check_key(key: Key) -> bytes:
    """The key's bytes (``b""``: unkeyed, blake2b's default); 16 to 64 bytes, since a short key
    can be guessed as easily as the texts it protects."""
    if key is None:
        return b""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    if not isinstance(raw, (bytes, bytearray)) or not 16 <= len(raw) <= 64:
        size = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else type(key).__name__
        raise ValueError("a sequence ID key must be str or bytes of 16 to 64 bytes (e.g. secrets.token_hex(32), "
                         f"kept secret), got {size}")
    return bytes(raw)


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
        return token_bytes(value)  # token lists: fast path
    try:
        return b"j" + json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except TypeError as err:
        raise TypeError(f"cannot derive a stable sequence ID from a value of type {type(value).__name__}") from err


def stable_id(value: Any, key: Key = None) -> int:
    """The sequence ID of one metadata value or document (str, bytes, int, token list, JSON-able).

    ``key``: a secret (16 to 64 bytes) that makes the ID a keyed hash, so it cannot be tested
    against guessed documents; use the same key for the whole run (and for forgetting later)."""
    if value is None:
        raise ValueError("cannot derive a sequence ID from None (null)")
    return content_id(_value_bytes(value), check_key(key))


def _ids_for(values: Sequence[Any], column: str, indices: Sequence[int], key: Key = None) -> list[int]:
    out = []
    for value, index in zip(values, indices):
        if value is None:
            raise ValueError(f"column {column!r} is null in row {index}: every row needs a value to derive its "
                             "sequence ID")
        out.append(stable_id(value, key))
    return out


# ---- datasets ---------------------------------------------------------------------------------------


def add_sequence_ids(dataset, by: str = "content", column: str | None = None, *, output_column: str = ID_COLUMN,
                     threshold: float = 0.5, num_perm: int = 128, shingle_size: int = 3,
                     batch_size: int = 1000, num_proc: int | None = None, desc: str | None = None,
                     key: Key = None, repeated_only: bool = False):
    """Return ``dataset`` with an ``output_column`` of sequence IDs (one int per row).

    Every repetition of a document must get the same ID, so IDs come from what repeats with it.
    Metadata and content IDs are a batched ``map`` (streams, parallel with ``num_proc``).

    Args:
        dataset: a ``datasets.Dataset``.
        by: ``"metadata"``: hash of ``column``'s value (URL, doc id, author: any hashable value),
            so rows that share it share sinks. ``"content"``: hash of the text (or token list) in
            ``column``, so exact repeats share an ID. ``"near_duplicates"``: MinHash LSH over word
            (or token) shingles (``datasketch``) with Jaccard ``threshold``; each cluster of
            near-duplicates takes the content ID of its first row, so lightly edited repeats share
            an ID. The defaults (3-word shingles, Jaccard 0.5) keep together copies of a 60-word
            document with three words changed in each (two changed words take 5-word shingles
            to 0.70). Raise ``threshold`` where distinct documents share a template. ``"ids"``:
            ``column`` already holds integer IDs (document numbers from your pipeline); they are
            validated (integers, ``>= 0`` or ``-1``; see :mod:`hf_memsinks.ids.validation`) and copied to
            ``output_column`` (or only validated, when ``column == output_column``).
        column: the column to derive IDs from; for ``"content"`` and ``"near_duplicates"`` it
            defaults to ``"text"``, else ``"input_ids"``.
        output_column: the new column (``"sequence_ids"``, what the collators and the model read).
        threshold, num_perm, shingle_size: ``"near_duplicates"`` only: Jaccard similarity that
            makes two rows one document, MinHash permutations, words (or tokens) per shingle.
        batch_size, num_proc, desc: passed to ``dataset.map``.
        key: a secret of 16 to 64 bytes for ``"metadata"``, ``"content"`` and ``"near_duplicates"``:
            keyed IDs (:func:`stable_id`). Use one whenever IDs may be seen by others (a forget
            list handed over, logs, a shared dataset), so nobody can check a guessed text against them.
        repeated_only: an ID carried by one row only becomes -1 (no ID: general neurons only), so
            that only repeated documents have sinks; with ``MemSinkConfig(general_sightings=0)``
            the general path then never trains on a repeated document (:func:`only_repeated`).
    """
    out = _add_sequence_ids(dataset, by, column, output_column, threshold, num_perm, shingle_size, batch_size,
                            num_proc, desc, key)
    if not repeated_only or len(out) == 0:
        return out
    values = out[output_column]
    if not all(isinstance(v, int) for v in values):
        raise ValueError("repeated_only=True needs one integer ID per row (not per-token IDs): count repeats "
                         "before packing")
    ids = only_repeated(torch.tensor(values, dtype=torch.long)).tolist()
    return out.remove_columns(output_column).add_column(output_column, ids, feature=out.features[output_column])


def only_repeated(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` (1-D, one per row of a whole training set) with every ID that occurs once set to -1:
    a document seen once has nothing to isolate, and under ``general_sightings=0`` a row without
    an ID is what trains the general path."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return torch.where((counts[inverse] > 1) & (ids >= 0), ids, torch.full_like(ids, -1))


def _add_sequence_ids(dataset, by, column, output_column, threshold, num_perm, shingle_size, batch_size, num_proc,
                      desc, key):
    from datasets import Dataset  # noqa: F401  (datasets is an optional dependency)

    names = list(dataset.column_names)
    map_args = dict(batched=True, batch_size=batch_size, with_indices=True, num_proc=num_proc)
    if by == "ids":
        if key is not None:
            raise ValueError("by='ids' copies the given IDs; key= applies to derived IDs only")
        return _validated_ids(dataset, column, output_column, map_args, desc)
    check_key(key)
    if output_column in names:
        raise ValueError(f"dataset already has a {output_column!r} column; pass output_column=... or remove it")
    column = _source_column(names, by, column)
    if len(dataset) == 0:  # map() adds no column to an empty dataset
        from datasets import Value

        return dataset.add_column(output_column, [], feature=Value("int64"))
    if by in ("metadata", "content"):
        def assign(batch, indices):
            return {output_column: _ids_for(batch[column], column, indices, key)}

        return dataset.map(assign, **map_args, desc=desc or f"sequence IDs from {column!r}")
    if by == "near_duplicates":
        return add_near_duplicate_ids(dataset, column, output_column, functools.partial(stable_id, key=key),
                                      threshold, num_perm, shingle_size, map_args, desc)
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


def ids_for_documents(documents: Iterable[Any], key: Key = None) -> torch.Tensor:
    """Content IDs (keyed with ``key``, see :func:`stable_id`) for an in-memory list of documents
    (texts or token lists), as a LongTensor."""
    return torch.tensor([stable_id(d, key) for d in documents], dtype=torch.long)
