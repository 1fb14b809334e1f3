"""Sequence IDs: the one validation of IDs, and the pure function from an ID to its active sinks."""

from .masks import NO_SEQUENCE, sink_mask
from .validation import check_sequence_ids

__all__ = ["NO_SEQUENCE", "check_sequence_ids", "sink_mask"]
