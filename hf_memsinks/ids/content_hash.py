"""Content identity: the one hash from a document's bytes (or tokens) to a 63-bit ID.

Sequence IDs derived from data (:func:`hf_memsinks.data.stable_id`, ``add_sequence_ids``) and the
content counts of ``general_sightings`` (:func:`hf_memsinks.sightings.routing.content_keys`) both
come from :func:`content_id`, so a token list has one identity in both: the content key of a row of
tokens is the ID that ``add_sequence_ids(by="content")`` gives that token list.

blake2b (8 bytes, personalised), so the ID is the same on every rank and in every Python run, unlike
Python's salted ``hash``; shifted to 63 bits, so it is a non-negative int64 and never ``NO_SEQUENCE``
(-1). With a secret ``key`` (blake2b's keyed mode) only the key's holder can link IDs to documents.
These values are saved with users' datasets: they must never change.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

PERSON = b"hf_memsinks"


def content_id(data: bytes, key: bytes = b"") -> int:
    """The 63-bit ID of ``data`` (``key``: empty, or a secret of 16 to 64 bytes)."""
    digest = hashlib.blake2b(data, digest_size=8, person=PERSON, key=key).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: non-negative int64, never -1


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """The canonical bytes of a token list: ``b"t"`` and the tokens as int64 (a text is ``b"s"`` and
    its UTF-8: :mod:`hf_memsinks.data.sequence_ids`)."""
    return b"t" + np.asarray(tokens, dtype=np.int64).tobytes()


def token_content_id(tokens: Sequence[int] | np.ndarray, key: bytes = b"") -> int:
    """The ID of a token list: what ``stable_id(tokens)`` gives it."""
    return content_id(token_bytes(tokens), key)


def token_content_ids(tokens: np.ndarray, lengths: Sequence[int], key: bytes = b"") -> list[int]:
    """:func:`token_content_id` of each of the token lists laid end to end in ``tokens`` (1-D),
    ``lengths[i]`` tokens each: the bytes are made once and sliced, not one array per list."""
    data = np.ascontiguousarray(tokens, dtype=np.int64).tobytes()
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64)) * 8
    return [content_id(b"t" + data[start:end], key) for start, end in zip([0, *ends[:-1].tolist()], ends.tolist())]
