"""Data: sequence IDs for datasets, collators that carry them, near-duplicate IDs and Goldfish."""

from .collators import MemSinkDataCollator, MemSinkPackingCollator
from .goldfish import GoldfishCollator, goldfish_labels
from .sequence_ids import ID_COLUMN, add_sequence_ids, ids_for_documents, stable_id

__all__ = ["ID_COLUMN", "GoldfishCollator", "MemSinkDataCollator", "MemSinkPackingCollator", "add_sequence_ids",
           "goldfish_labels", "ids_for_documents", "stable_id"]
