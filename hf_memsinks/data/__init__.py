"""Data: sequence IDs for datasets (:mod:`.sequence_ids`), collators that carry them
(:mod:`.collators`), a check of given IDs against the data's repeats (:mod:`.id_check`), and Goldfish
loss (:mod:`.goldfish`)."""

from .collators import MemSinkDataCollator, MemSinkPackingCollator, example_ids
from .goldfish import GoldfishCollator
from .id_check import IdCheck, check_ids
from .sequence_ids import ID_COLUMN, add_sequence_ids, ids_for_documents, only_repeated, stable_id

__all__ = ["ID_COLUMN", "GoldfishCollator", "IdCheck", "MemSinkDataCollator", "MemSinkPackingCollator",
           "add_sequence_ids", "check_ids", "example_ids", "ids_for_documents", "only_repeated", "stable_id"]
