"""The checks behind every config field: each takes a value and returns it normalised, or raises
:class:`Invalid` with why; :func:`validate` runs the checks a dataclass's fields carry
(:func:`setting`) and names the field in the error."""

from __future__ import annotations

import dataclasses
import difflib

TARGET_MODULE_KEYS = {"mlp", "in_proj", "out_proj", "in_proj_chunks", "width_attr", "norm"}


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``: every misspelling hint."""
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


class Invalid(ValueError):
    """A field's value is wrong; :func:`validate` adds the field's name and the value."""


def setting(default, check, help: str):
    """A dataclass field with its ``help`` (PEFT's ``metadata={"help": ...}`` style) and the ``check``
    that validates it. Defaults are immutable (None for no list or dict)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


def validate(obj) -> None:
    """Run every field's check, in field order, keeping what it returns (frozen dataclasses too)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            normalised = f.metadata["check"](value)
        except Invalid as why:
            fail(obj, f.name, str(why))
        if normalised is not value:
            object.__setattr__(obj, f.name, normalised)


def fail(obj, name: str, why: str):
    """``ValueError("MemSinkConfig.name: why (got value)")``: every config error names its field."""
    raise ValueError(f"{type(obj).__name__}.{name}: {why} (got {getattr(obj, name)!r})") from None


def unknown_keys(given, allowed) -> str | None:
    """``"unknown keys 'x' (did you mean ...?); allowed: [...]"`` for keys of ``given`` not ``allowed``."""
    unknown = set(given) - set(allowed)
    if not unknown:
        return None
    hints = [repr(k) + did_you_mean(str(k), allowed) for k in sorted(unknown, key=str)]
    return f"unknown keys {', '.join(hints)}; allowed: {sorted(allowed)}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def probability(value):
    if not _number(value) or not 0.0 < value < 1.0:
        raise Invalid("must be a number strictly between 0 and 1")
    return float(value)


def number_from(low: float, high: float):
    def check(value):
        if not _number(value) or not low <= value <= high:
            raise Invalid(f"must be a number from {low:g} to {high:g}")
        return float(value)
    return check


def one_of(choices: tuple):
    def check(value):
        if value not in choices:
            raise Invalid(f"must be one of {choices}")
        return value
    return check


def int_or_none(minimum: int, why: str):
    def check(value):
        if value is not None and (not _integer(value) or value < minimum):
            raise Invalid(why)
        return value
    return check


def int_from(minimum: int, why: str):
    def check(value):
        if not _integer(value) or not minimum <= value < 2**63:
            raise Invalid(why)
        return value
    return check


def int64(value):
    if not _integer(value) or not -(2**63) <= value < 2**63:
        raise Invalid("must be an integer that fits in int64")
    return value


def boolean(value):
    if not isinstance(value, bool):
        raise Invalid("must be True or False")
    return value


def layer_list(value):
    """A list of layer indices, or a dict of layer index -> that layer's sink_fraction (string keys,
    as JSON writes them, become ints)."""
    if value is None:
        return None
    if isinstance(value, dict):
        layers = {}
        for key, fraction in value.items():
            index = int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key
            if not _integer(index):
                raise Invalid(f"layer index {key!r} is not an integer")
            try:
                layers[index] = probability(fraction)
            except Invalid:
                raise Invalid(f"layer {key}'s sink_fraction must be a number strictly between 0 and 1") from None
        if not layers:
            raise Invalid("must name at least one layer (None means all)")
        return layers
    if isinstance(value, int) or not all(_integer(i) for i in value):
        raise Invalid("must be a list of layer indices, a dict of layer index -> sink_fraction, or None")
    if len(value) == 0:
        raise Invalid("must name at least one layer (None means all)")
    return list(value)


def mlp_module_names(tm):
    """The MLP's module names, completed with their defaults."""
    if tm is None:
        return None
    if not isinstance(tm, dict):
        raise Invalid("must be a dict like {'mlp': 'mlp', 'in_proj': ['up_proj'], 'out_proj': 'down_proj'}")
    if unknown_keys(tm, TARGET_MODULE_KEYS):
        raise Invalid(unknown_keys(tm, TARGET_MODULE_KEYS))
    width_attr = tm.get("width_attr")
    if width_attr is not None and (not isinstance(width_attr, str) or not width_attr.isidentifier()):
        raise Invalid("'width_attr' must be the name of a model config field, or None")
    if tm.get("norm") is not None and (not isinstance(tm["norm"], str) or not tm["norm"]):
        raise Invalid("'norm' must be the name of the MLP's norm over its hidden neurons, or None")
    if not isinstance(tm.get("out_proj"), str) or not tm["out_proj"]:
        raise Invalid("needs 'out_proj': the name of the MLP's output (down) projection")
    in_proj = [tm["in_proj"]] if isinstance(tm.get("in_proj"), str) else tm.get("in_proj")
    if not in_proj or not all(isinstance(n, str) and n for n in in_proj):
        raise Invalid("needs 'in_proj': the name(s) of the MLP's input (up/gate) projections")
    chunks = tm.get("in_proj_chunks", 1)
    if not _integer(chunks) or chunks < 1:
        raise Invalid("'in_proj_chunks' must be a positive integer")
    return {"mlp": tm.get("mlp", "mlp"), "in_proj": list(in_proj), "out_proj": tm["out_proj"],
            "in_proj_chunks": chunks, "width_attr": width_attr,
            **({"norm": tm["norm"]} if tm.get("norm") is not None else {})}
