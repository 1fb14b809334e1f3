"""Sequence IDs shared by near-duplicate documents (``add_sequence_ids(by="near_duplicates")``).

Lightly edited repeats of a document should share its sinks, so rows are clustered by MinHash LSH
over word shingles (``datasketch``) and each cluster takes the content ID of its first row.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

_MINHASH_SCHEME = "affine64"  # datasketch >= 2.0 asks for the scheme by name


def _shingles(value: Any, size: int, column: str, index: int) -> list[bytes]:
    """Word shingles of a text, token shingles of a token list; anything else cannot be compared."""
    if isinstance(value, str):
        tokens = value.lower().split()
        grams = [" ".join(tokens[i:i + size]) for i in range(max(1, len(tokens) - size + 1))]
        return [g.encode("utf-8") for g in grams]
    if isinstance(value, (list, tuple, np.ndarray)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value):
        tokens = [int(t) for t in value]
        return [np.asarray(tokens[i:i + size], dtype=np.int64).tobytes()
                for i in range(max(1, len(tokens) - size + 1))]
    raise TypeError(f"by='near_duplicates' compares texts or token lists; column {column!r} holds a "
                    f"{type(value).__name__} in row {index}: use by='content' or by='metadata' for it")


def add_near_duplicate_ids(dataset, column: str, output_column: str, content_id: Callable[[Any], int],
                           threshold: float, num_perm: int, shingle_size: int, map_args: dict, desc: str | None):
    """``dataset`` with ``output_column``: per row, ``content_id`` of the first row of its cluster."""
    try:
        from datasketch import MinHash
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("by='near_duplicates' needs datasketch: pip install datasketch") from err
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")

    def signatures(batch, indices):
        values = batch[column]
        for value, index in zip(values, indices):
            if value is None:
                raise ValueError(f"column {column!r} is null in row {index}")
        hashes = MinHash.bulk([_shingles(v, shingle_size, column, i) for v, i in zip(values, indices)],
                              num_perm=num_perm, seed=1, scheme=_MINHASH_SCHEME)
        return {"_memsink_minhash": [h.hashvalues.astype(np.uint64).view(np.int64).tolist() for h in hashes],
                "_memsink_content_id": [content_id(v) for v in values]}

    signed = dataset.map(signatures, **map_args, desc=desc or f"MinHash of {column!r}")
    roots = _cluster_roots(signed.select_columns(["_memsink_minhash"]), num_perm, threshold)
    content_ids = signed["_memsink_content_id"]

    def assign(batch, indices):
        return {output_column: [content_ids[roots[i]] for i in indices]}

    return signed.map(assign, batched=True, batch_size=map_args["batch_size"], with_indices=True,
                      remove_columns=["_memsink_minhash", "_memsink_content_id"], desc="assign cluster IDs")


def _cluster_roots(signatures, num_perm: int, threshold: float) -> list[int]:
    """Per row, the first row of its near-duplicate cluster.

    One sequential pass over the signatures (num_perm ints per row), in row order, so the result
    does not depend on batching or process count. LSH bands are tuned for recall; each candidate
    is then confirmed by its estimated Jaccard similarity."""
    from datasketch import MinHash, MinHashLSH
    from tqdm.auto import tqdm

    def minhash(row) -> MinHash:
        values = np.asarray(row["_memsink_minhash"], dtype=np.int64).view(np.uint64)
        return MinHash(num_perm=num_perm, seed=1, scheme=_MINHASH_SCHEME, hashvalues=values)

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, row in enumerate(tqdm(signatures, desc="near-duplicate clusters", disable=len(signatures) < 10_000)):
        mh = minhash(row)
        parent.append(i)
        for j in lsh.query(mh):
            a, b = root(i), root(int(j))
            if a == b:  # already one cluster: no need to read j's signature (copies of one
                continue  # document would otherwise cost a read per pair of copies)
            if mh.jaccard(minhash(signatures[int(j)])) >= threshold:
                parent[max(a, b)] = min(a, b)  # the first row of a cluster is its root
        lsh.insert(i, mh)
    return [root(i) for i in range(len(parent))]
