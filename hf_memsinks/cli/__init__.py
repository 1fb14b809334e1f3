"""``hf-memsinks``: export, audit, install-hook, check-ids, audit-privacy (:mod:`.main`)."""

from ..export import audit, export
from .main import main

__all__ = ["audit", "export", "main"]
