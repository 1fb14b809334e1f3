"""``check_ids`` (``hf-memsinks check-ids DATASET``): how consistent a dataset's sequence IDs are,
measured before training, and which ``add_sequence_ids(by=...)`` to use.

MemSinks isolates a repeated document only if its repetitions carry one ID: a repetition with
another document's ID trains the general neurons without its own sinks, and isolation collapses
fast (docs/noisy_ids.md). The text itself says which rows repeat: rows are clustered as
``add_sequence_ids(by="near_duplicates")`` clusters them, and each cluster of two or more rows
should carry one ID. The share of those rows whose ID is not their cluster's most common one
estimates the share of wrong IDs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

DISAGREEMENT_LIMIT = 0.01  # wrong IDs on repeated rows above which content-derived IDs are safer


@dataclass
class IdCheck:
    """What ``check_ids`` found. ``recommended_by`` is the ``add_sequence_ids(by=...)`` to use."""

    rows: int
    rows_without_id: int          # None, or -1 (MemSinks' "no ID")
    distinct_ids: int
    repeated_groups: int          # near-duplicate clusters of two or more rows
    repeated_rows: int            # the rows in those clusters
    exact_repeats: bool           # every cluster's rows are identical (by="content" finds them all)
    split_groups: int             # clusters whose rows carry more than one ID (or some no ID)
    disagreeing_rows: int         # repeated rows whose ID is not their cluster's most common one
    shared_ids: int               # IDs on rows of several clusters (coarse IDs: sinks shared, which holds)
    recommended_by: str
    reason: str

    @property
    def disagreement(self) -> float:
        """The share of repeated rows with a wrong (or no) ID: an estimate of q in docs/noisy_ids.md."""
        return self.disagreeing_rows / self.repeated_rows if self.repeated_rows else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "disagreement": self.disagreement}

    def __str__(self) -> str:
        lines = [f"{self.rows} rows, {self.distinct_ids} distinct IDs, {self.rows_without_id} rows without an ID",
                 f"{self.repeated_groups} groups of repeated rows ({self.repeated_rows} rows; "
                 f"{'exact' if self.exact_repeats else 'near-duplicate'} copies)"]
        if self.distinct_ids:
            lines += [f"{self.split_groups} of them carry more than one ID; {self.disagreeing_rows} repeated rows "
                      f"({self.disagreement:.1%}) carry an ID other than their group's",
                      f"{self.shared_ids} IDs label several groups (coarse IDs)"]
        return "\n".join(lines + [f"use add_sequence_ids(by={self.recommended_by!r}): {self.reason}"])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1)


def check_ids(dataset, ids_column: str | None = "sequence_ids", text_column: str = "text", *,
              threshold: float = 0.5, num_perm: int = 128, shingle_size: int = 3) -> IdCheck:
    """Check ``dataset``'s IDs (``ids_column``: any hashable metadata, or sequence IDs; ``None`` or a
    column the dataset lacks: no IDs yet) against the repeats its ``text_column`` (texts or token
    lists) shows. ``threshold``, ``num_perm``, ``shingle_size``: as ``add_sequence_ids(by="near_duplicates")``."""
    from .sequence_ids import add_sequence_ids

    names = list(dataset.column_names)
    if text_column not in names:
        raise ValueError(f"text_column {text_column!r} is not a column of the dataset (have {names})")
    if ids_column is not None and ids_column not in names:
        ids_column = None
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    texts = dataset.select_columns([text_column])
    clusters = add_sequence_ids(texts, by="near_duplicates", column=text_column, output_column="_cluster",
                                threshold=threshold, num_perm=num_perm, shingle_size=shingle_size)["_cluster"]
    contents = add_sequence_ids(texts, by="content", column=text_column, output_column="_content")["_content"]
    labels = dataset[ids_column] if ids_column else [None] * len(dataset)
    members: dict[int, list[int]] = {}
    for row, cluster in enumerate(clusters):
        members.setdefault(cluster, []).append(row)
    repeated = [rows for rows in members.values() if len(rows) > 1]
    exact = all(len({contents[r] for r in rows}) == 1 for rows in repeated)
    split = disagreeing = 0
    for rows in repeated:
        counts = Counter("<none>" if _missing(labels[r]) else repr(labels[r]) for r in rows)
        split += len(counts) > 1 or "<none>" in counts
        top, n = counts.most_common(1)[0]
        disagreeing += len(rows) - (0 if top == "<none>" else n)
    clusters_of: dict[str, set] = {}
    for label, cluster in zip(labels, clusters):
        if not _missing(label):
            clusters_of.setdefault(repr(label), set()).add(cluster)
    check = IdCheck(rows=len(dataset), rows_without_id=sum(map(_missing, labels)), distinct_ids=len(clusters_of),
                    repeated_groups=len(repeated), repeated_rows=sum(map(len, repeated)), exact_repeats=exact,
                    split_groups=split, disagreeing_rows=disagreeing,
                    shared_ids=sum(len(c) > 1 for c in clusters_of.values()), recommended_by="", reason="")
    check.recommended_by, check.reason = _recommend(check, ids_column)
    return check


def _recommend(check: IdCheck, ids_column: str | None) -> tuple[str, str]:
    derived = "content" if check.exact_repeats else "near_duplicates"
    how = ("every repeat is an exact copy, so the content hash gives all copies one ID" if check.exact_repeats else
           "repeats are edited copies; MinHash clusters give them one ID")
    if not check.repeated_groups:
        return ("metadata" if ids_column else "content",
                "no row repeats in this dataset: there is nothing to isolate, any IDs do")
    if ids_column is None:
        return derived, f"the dataset has no IDs; {how}"
    if check.disagreement > DISAGREEMENT_LIMIT:
        return derived, (f"{check.disagreement:.1%} of the repeated rows carry another (or no) ID, and wrong IDs on "
                         f"a few repetitions undo isolation (docs/noisy_ids.md); {how}")
    coarse = (f"; {check.shared_ids} IDs label several documents: under general_sightings set "
              "sightings_by='content', or every document after an ID's first stays off the general path"
              if check.shared_ids else "")
    return "metadata", (f"the IDs agree on {1 - check.disagreement:.1%} of the repeated rows; keep them "
                        f"(add_sequence_ids(by='metadata', column={ids_column!r}), or by='ids' for integer IDs)"
                        + coarse)
