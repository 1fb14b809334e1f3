"""Memorization measures for a model and its training documents."""

from .memorization import document_losses, extraction_hits

__all__ = ["document_losses", "extraction_hits"]
