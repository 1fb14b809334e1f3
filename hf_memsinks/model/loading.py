"""``AutoMemSinkModelForCausalLM``: one call that loads a base model and patches it, or restores a
saved memsink checkpoint (:mod:`hf_memsinks.checkpoints.format`), from a local directory or the Hub."""

from __future__ import annotations

import os

from transformers import AutoModelForCausalLM, PreTrainedModel

from ..checkpoints.format import HUB_KWARGS, load_ignoring_sinks, load_sink_tensors, sink_tensor_keys
from ..checkpoints.layout_record import LayoutRecord
from ..config import MemSinkConfig, find_config_file
from ..transformers_internals import load_kwargs
from .add_sinks import get_memsink_model, patch_model


class AutoMemSinkModelForCausalLM:
    """``from_pretrained`` for memsink models, in the style of the ``Auto*`` classes."""

    def __init__(self, *args, **kwargs):
        raise EnvironmentError("use AutoMemSinkModelForCausalLM.from_pretrained(...) or .from_config(...)")

    @classmethod
    def from_config(cls, config, memsink_config: MemSinkConfig, **kwargs) -> PreTrainedModel:
        """A freshly initialised model of ``config``, patched.

        Args:
            config: a Transformers model config (``AutoConfig``).
            memsink_config: the sinks to add.
            **kwargs: passed to ``AutoModelForCausalLM.from_config``.
        """
        return get_memsink_model(AutoModelForCausalLM.from_config(config, **kwargs), memsink_config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        memsink_config: MemSinkConfig | None = None, **kwargs) -> PreTrainedModel:
        """Restore a saved memsink checkpoint, or load a plain model and patch it.

        Args:
            pretrained_model_name_or_path: a local checkpoint directory or a Hub model name.
            memsink_config: None for a memsink checkpoint (it has ``memsink_config.json``); the
                sinks to add for a plain model.
            *model_args, **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

        Raises:
            ValueError: the checkpoint and ``memsink_config`` do not fit together (a memsink
                checkpoint with a config given, sink tensors without their config, a layout that
                does not match the weights).
            FileNotFoundError: no such directory, or no model in it.
        """
        path = pretrained_model_name_or_path
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        if os.path.isfile(path):
            raise ValueError(f"{path} is a file; pass the checkpoint directory (the one with config.json)")
        local = os.path.join(os.fspath(path), hub_kwargs.get("subfolder", "")) if os.path.isdir(path) else None
        if local is None and _looks_local(path):
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        config_file = find_config_file(local or path, **({} if local else hub_kwargs))
        sink_keys = sink_tensor_keys(local) if local is not None else []  # also: every weights file readable
        if config_file is None:
            return _patch_plain(path, local, sink_keys, memsink_config, hub_kwargs, model_args, kwargs)
        if memsink_config is not None:
            raise ValueError(
                f"{path} is already a memsink checkpoint (it has {os.path.basename(config_file)}); "
                "load it without memsink_config, or load a plain base model to patch"
            )
        saved, record = MemSinkConfig.from_pretrained(config_file), LayoutRecord.from_pretrained(config_file)
        model = load_ignoring_sinks(path, *model_args, **kwargs)
        try:
            patch_model(model, saved, record)
        except ValueError as err:
            raise ValueError(f"{config_file} does not match the weights of {path}: {err}") from None
        load_sink_tensors(model, local or path, hub_kwargs, described_by=config_file)
        return model


def _patch_plain(path, local: str | None, sink_keys: list[str], memsink_config: MemSinkConfig | None,
                 hub_kwargs: dict, model_args: tuple, kwargs: dict) -> PreTrainedModel:
    """A checkpoint without ``memsink_config.json``: a plain model to patch with ``memsink_config``
    (or a memsink checkpoint whose config was lost, loadable only with the exact settings)."""
    if sink_keys and memsink_config is None:
        raise ValueError(
            f"{path} holds sink tensors ({sink_keys[0]}, ...) but no memsink_config.json: it is a memsink "
            "checkpoint whose config was lost. Restore memsink_config.json (it holds the sink layout); "
            "memsink_config=MemSinkConfig(...) works only with the exact settings of the training run, "
            "and is checked against these tensors"
        )
    if memsink_config is None:
        if local is not None and not os.path.isfile(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
        if local is None:
            raise FileNotFoundError(
                f"{path} is not a local directory, and no memsink_config.json was found for it on the Hub "
                "(no such model, or no network). For a plain model pass memsink_config=MemSinkConfig(...)"
            )
        raise ValueError(
            f"{path} holds no memsink_config.json, so it is a plain model: pass "
            "memsink_config=MemSinkConfig(...) to patch it with sinks"
        )
    if not sink_keys:
        model = AutoModelForCausalLM.from_pretrained(path, *model_args, **load_kwargs(kwargs))
        return get_memsink_model(model, memsink_config)
    model = get_memsink_model(load_ignoring_sinks(path, *model_args, **kwargs), memsink_config)
    load_sink_tensors(model, local, hub_kwargs, described_by="the memsink_config passed")
    return model


def _looks_local(path) -> bool:
    """A path that cannot be a Hub repo id (``name`` or ``org/name``): absolute, relative with
    ``./``, ``~``, more than one ``/``, or characters repo ids do not have."""
    text = os.fspath(path)
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
            or os.sep != "/" and os.sep in text or not all(c.isalnum() or c in "-_./" for c in text))
