"""Memorization measures for a model and its training documents: loss and extraction, membership
inference (loss, zlib, Min-K%, Min-K%++ AUC) and the exposure of planted secrets."""

from .exposure import exposure
from .membership import ATTACKS, membership_auc, membership_scores, pooled_auc, privleak, roc_auc
from .memorization import document_losses, extraction_hits

__all__ = ["ATTACKS", "document_losses", "exposure", "extraction_hits", "membership_auc", "membership_scores",
           "pooled_auc", "privleak", "roc_auc"]
