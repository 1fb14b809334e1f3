"""Data: sequence IDs for datasets (:mod:`.sequence_ids`), collators that carry them
(:mod:`.collators`), and Goldfish loss (:mod:`.goldfish`)."""

from .collators import MemSinkDataCollator, MemSinkPackingCollator, example_ids
from .goldfish import GoldfishCollator
from .sequence_ids import ID_COLUMN, add_sequence_ids, ids_for_documents, stable_id

__all__ = ["ID_COLUMN", "GoldfishCollator", "MemSinkDataCollator", "MemSinkPackingCollator", "add_sequence_ids",
           "example_ids", "ids_for_documents", "stable_id"]
