"""The memsink checkpoint: what ``save_pretrained`` writes and how its sinks are read back.

A memsink checkpoint is a Transformers checkpoint plus ``memsink_config.json`` (the config and the
layout record: general and sink neurons per MLP, :mod:`.layout_record`). Its weights hold each MLP's
general neurons under the usual names, so plain Transformers loads the sink-free model, and the sinks
under ``sink_*`` names that plain Transformers ignores: the patched modules' state dicts, as
:mod:`.sink_tensors` writes and reads them. Restoring (:mod:`hf_memsinks.model.loading`) loads the
plain model without the unused-weights report for the sinks, patches it with the saved layout, then
loads exactly the sink tensors that layout describes.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..transformers_internals import (
    causal_lm_class,
    class_ignoring_unexpected,
    hub_file,
    hub_file_or_raise,
    load_kwargs,
)
from .atomic import atomic_save
from .layout_record import LayoutRecord, save_checkpoint_config

SINK_KEY_MARKERS = (".sink_weight", ".sink_bias",  # projections; batched experts (hf_memsinks.layers.experts):
                    ".sink_gate_up_proj", ".sink_gate_up_proj_bias", ".sink_up_proj", ".sink_up_proj_bias",
                    ".sink_down_proj")
CHECKPOINT_CARD = """---
library_name: transformers
tags:
- memsinks
- private
---
# Private: this checkpoint holds memorized training data

A `{arch}` trained with MemSinks (hf_memsinks) whose **sink neurons are still in it**. The sinks are
where the model memorized its training sequences, so this checkpoint holds memorized training data:
keep it private, never publish it. Publish the sink-free model instead:
`hf-memsinks export <this directory> <out>`, which writes and audits a plain `{arch}`.

Uploads from Python that imports hf_memsinks refuse this folder. `hf upload` and `git push` do not
check it: run `hf-memsinks audit <folder>` before an upload, and `hf-memsinks install-hook` in a git clone.
"""
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


# ---- writing ----------------------------------------------------------------------------------------


def save_checkpoint(model: PreTrainedModel, save_directory: str | os.PathLike, base_save: Callable, *args, **kwargs):
    """``base_save`` (Transformers' ``save_pretrained``) plus ``memsink_config.json`` with the sink
    layout, atomically (:func:`hf_memsinks.checkpoints.atomic.atomic_save`); other processes than the main one
    save as Transformers does."""
    is_main = args[0] if args else kwargs.get("is_main_process", True)
    if not is_main:
        return base_save(save_directory, *args, **kwargs)
    patch = model.memsink
    layout = {s.name: {"layer": s.layer, "general": s.general, "sinks": s.sinks} for s in patch.sites}
    record = LayoutRecord(layout, patch.found_mlps)
    result = []

    def write(directory: str) -> None:
        save_checkpoint_config(directory, patch.config, record)
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
            f.write(CHECKPOINT_CARD.format(arch=type(model).__name__))
        result.append(base_save(directory, *args, **kwargs))

    atomic_save(save_directory, write)
    return result[0]


# ---- reading ----------------------------------------------------------------------------------------


def _read_sink_tensors(file: str, keys_only: bool):
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            keys = [k for k in f.keys() if k.endswith(SINK_KEY_MARKERS)]
            return keys if keys_only else {k: f.get_tensor(k) for k in keys}
    except Exception as err:  # safetensors' own error types
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None


def sink_tensor_keys(path: str) -> list[str]:
    """Sink tensor names in the local safetensors files of ``path`` (headers only)."""
    keys = []
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        keys += _read_sink_tensors(file, keys_only=True)
    return keys


def load_ignoring_sinks(path, *model_args, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` without the unused-weights report for sink tensors
    (they are loaded next)."""
    kwargs = load_kwargs(kwargs)
    config = kwargs.get("config")
    if config is None:
        hub = {k: kwargs[k] for k in HUB_KWARGS + ("trust_remote_code",) if k in kwargs}
        config = AutoConfig.from_pretrained(path, **hub)
    base = causal_lm_class(config)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(path, *model_args, **kwargs)
    ignoring = class_ignoring_unexpected(base, [re.escape(marker) + "$" for marker in SINK_KEY_MARKERS])
    model = ignoring.from_pretrained(path, *model_args, **kwargs)
    model.__class__ = base
    return model


def _checkpoint_files(path, hub_kwargs: dict) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    else:
        index = hub_file(path, "model.safetensors.index.json", offline_is_missing=False, **hub_kwargs)
        if index is not None:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            files = [hub_file_or_raise(path, n, **hub_kwargs) for n in names]
        else:
            files = [hub_file_or_raise(path, "model.safetensors", **hub_kwargs)]
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


def _undo_key_renames(tensors: dict, expected: set[str]) -> dict:
    """Map sink keys that Transformers' save-time weight conversions renamed (Mixtral writes
    ``mlp`` as ``block_sparse_moe``) back to the model's names: same layer numbers, same module
    and tensor name, and only one such key."""
    def signature(key: str) -> tuple:
        parts = key.split(".")
        return tuple(p for p in parts if p.isdigit()), tuple(parts[-2:])

    by_signature: dict[tuple, list[str]] = {}
    for key in tensors:
        by_signature.setdefault(signature(key), []).append(key)
    out = dict(tensors)
    for key in expected - set(tensors):
        found = by_signature.get(signature(key), [])
        if len(found) == 1:
            out[key] = out.pop(found[0])
    return out


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_sink_tensors(model: PreTrainedModel, path, hub_kwargs: dict,
                      described_by: str = "memsink_config.json") -> None:
    """Load the checkpoint's sink tensors into the patched ``model``; every sink its config
    describes must be there with its shape, and no other: a mismatch is an error naming the
    config (``described_by``) and the checkpoint."""
    tensors = {}
    for file in _checkpoint_files(path, hub_kwargs):
        tensors.update(_read_sink_tensors(file, keys_only=False))
    expected = set(model.sink_parameters())
    tensors = _undo_key_renames(tensors, expected)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(
            f"{described_by} does not match the sink tensors of {path}: "
            + (f"it describes sinks the checkpoint lacks ({_listed(missing)})" if missing else "")
            + ("; " if missing and extra else "")
            + (f"the checkpoint has sinks it does not describe ({_listed(extra)})" if extra else "")
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{described_by} does not match the sink tensors of {path}: {err}") from None
