"""``memsink_config.json``: where it is, its text, and reading it. It holds a MemSinkConfig and, in a
checkpoint, the layout record written beside it (:mod:`hf_memsinks.checkpoints.layout_record`)."""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG_NAME = "memsink_config.json"
# The layout record's keys, at the top level of a checkpoint's memsink_config.json; MemSinkConfig skips them.
RECORD_KEYS = ("sink_layout", "found_mlps")


def config_file_text(data: dict[str, Any]) -> str:
    """The text of ``memsink_config.json`` for ``data``: sorted keys, the library version stamped in."""
    from ..version import __version__

    return json.dumps({**data, "hf_memsinks_version": __version__}, indent=2, sort_keys=True) + "\n"


def read_config_file(path: str | os.PathLike, **hub_kwargs) -> tuple[str, dict[str, Any]]:
    """(file, every key of its JSON object) for ``memsink_config.json`` of a directory, a file path or a
    Hub repository."""
    file = find_config_file(path, **hub_kwargs)
    if file is None:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!s}: it is not a hf_memsinks checkpoint")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): this checkpoint's memsink config is corrupt") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a memsink config is a JSON object, got {type(data).__name__}")
    return file, data


def find_config_file(path: str | os.PathLike, **hub_kwargs) -> str | None:
    """Path of ``memsink_config.json`` for a local dir/file or Hub repo id, or None if it has none."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, CONFIG_NAME)
        return file if os.path.isfile(file) else None
    from ..transformers_internals import hub_file

    return hub_file(path, CONFIG_NAME, **hub_kwargs)
