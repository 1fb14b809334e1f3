"""Sequence IDs: the one validation of IDs, the pure function from an ID to its active sinks, and the
one content hash that derives IDs from documents (:mod:`.content_hash`)."""

from .masks import NO_SEQUENCE, sink_mask
from .validation import check_sequence_ids

__all__ = ["NO_SEQUENCE", "check_sequence_ids", "sink_mask"]
