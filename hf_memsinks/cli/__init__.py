"""``hf-memsinks``: export, audit, install-hook, check-ids, audit-privacy (:mod:`.main`)."""

from ..export import export
from ..publishing.audit import audit
from .main import main

__all__ = ["audit", "export", "main"]
