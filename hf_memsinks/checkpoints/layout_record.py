"""The layout record: what a checkpoint saves about its patched structure, so that restoring rebuilds it
exactly: per MLP its general and sink widths, and how the MLPs were found (restoring then runs no
discovery and does not depend on the Transformers version). It is written by ``save_pretrained`` and
never set by a user, so it is no MemSinkConfig field. It shares ``memsink_config.json`` with the
config, as the top-level keys ``sink_layout`` and ``found_mlps`` where checkpoints have always had them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config import CONFIG_NAME, MemSinkConfig, config_file_text, read_config_file


@dataclass(frozen=True)
class LayoutRecord:
    """The saved structure of a patched model."""

    sink_layout: dict[str, dict[str, int]]  # MLP name -> {"layer": ..., "general": ..., "sinks": ...}
    # How the MLPs were found (hf_memsinks.mlp_discovery.resolve.found_record); checkpoints older than it lack it.
    found_mlps: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        found = {} if self.found_mlps is None else {"found_mlps": self.found_mlps}
        return {"sink_layout": self.sink_layout, **found}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayoutRecord | None":
        """The record among the keys of a ``memsink_config.json``; None for a config saved on its own."""
        if data.get("sink_layout") is None and data.get("found_mlps") is None:
            return None
        if not isinstance(data.get("sink_layout"), dict):
            raise ValueError(f"the saved sink_layout must map each MLP to its widths, got {data.get('sink_layout')!r}")
        return cls(data["sink_layout"], data.get("found_mlps"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs) -> "LayoutRecord | None":
        """The record in ``memsink_config.json`` of a checkpoint directory, a file path or a Hub repository."""
        file, data = read_config_file(path, **hub_kwargs)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None


def save_checkpoint_config(directory: str, config: MemSinkConfig, record: LayoutRecord) -> None:
    """``memsink_config.json`` of a checkpoint: the config's fields and the record's, at one level."""
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        f.write(config_file_text({**config.to_dict(), **record.to_dict()}))
