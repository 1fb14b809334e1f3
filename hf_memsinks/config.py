"""MemSinkConfig: what to patch and how sinks behave, with a JSON round-trip.

A plain dataclass (like PEFT's ``LoraConfig``): every field is validated at construction, so a bad
value fails where it was written, with the field's name in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "memsink_config.json"

MODES = ("auto", "split", "add")
SINK_INITS = ("random", "copy")
SIGHTINGS_BY = ("ids+content", "ids", "content")
EVAL_SCALINGS = ("none", "paper")
MASK_SCHEMES = ("hash", "reference")
TARGET_MODULE_KEYS = {"mlp", "in_proj", "out_proj", "in_proj_chunks", "width_attr", "norm"}


# MemSinkConfig.for_finetuning(): the recipe the fine-tuning benchmark (configs/finetune.yaml) measured best.
FINETUNE_RECIPE = {"mode": "add", "sink_fraction": 0.5, "sink_active_prob": 0.05, "sink_init": "copy",
                   "sink_lr_scale": 7.0}


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``: every misspelling hint."""
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


@dataclass
class MemSinkConfig:
    """How to turn a model's MLP neurons into general neurons plus memorization sinks.

    Args:
        sink_fraction: share of each patched MLP's hidden width that is sinks (paper: ``1 - p_gen``).
            In ``"split"`` mode the sinks are carved out of the existing width; in ``"add"`` mode new
            sink neurons are appended so that they make up this share of the new width.
        sink_active_prob: chance that a sink is active for a given sequence ID (paper: ``p_mem``).
        mode: ``"split"`` (train from scratch, the paper's setting), ``"add"`` (append sinks to a
            pretrained model; new sinks start with zero output weights so outputs are unchanged) or
            ``"auto"`` (the default): ``"split"`` for a model built from a config, and an error naming
            :meth:`for_finetuning` for one that holds pretrained weights (split mode would turn part
            of its pretrained neurons into sinks, which ``remove_sinks`` deletes).
        layers: decoder-layer indices that get sinks (negative indices count from the end);
            ``None`` patches every layer.
        num_sink_neurons: exact number of sinks per patched MLP; overrides ``sink_fraction``.
        salt: mixed into the mask hash; a different salt gives an independent set of masks.
        eval_scaling: how general neurons are scaled when sinks are dropped at evaluation:
            ``"none"`` (x1) or ``"paper"`` (x (p_gen + p_mem) / p_gen, as the published code does).
        mask_scheme: ``"hash"`` (ours: 64-bit mixing, any non-negative ID) or ``"reference"``
            (the published function, bit for bit; ID 0 is rejected there).
        per_layer_masks: draw an independent mask per layer instead of one mask shared by all
            layers (the published setting). Costs one mask per layer per forward.
        require_sequence_ids: if True a training forward without ``sequence_ids`` is an error; if
            False it trains the general neurons only (sinks inactive), e.g. for unlabeled data.
        init_seed: seed of the generator that initialises new sink neurons in ``"add"`` mode, so
            every process builds the same weights.
        sink_init: how ``"add"`` mode initialises the new sinks' input weights: ``"random"`` (drawn
            like the existing ones) or ``"copy"`` (copies of randomly chosen pretrained neurons:
            features that already fit the text, so a sink can fit a document as fast as the
            general neurons). Output weights start at zero either way.
        sink_lr_scale: the sink neurons' step as a multiple of the optimizer's (1: the same step).
            Default 4: a repeated document's loss falls on whichever neurons fit it fastest, so
            faster sinks take the memorization the general neurons would otherwise keep
            (docs/isolation.md). Applied by an optimizer hook that every ``Trainer`` attaches
            (``MemSinkSFTTrainer`` too); a training loop of your own calls
            :func:`hf_memsinks.attach_sink_lr` (training without it warns once).
        general_sightings: the privacy setting. ``None`` (the paper's method): every repetition of a
            document trains the general neurons and its sinks. ``K``: only the first ``K`` sightings
            of each sequence ID train the general path, with no sink on; every later one trains that
            ID's sinks alone, all else frozen for it (hf_memsinks.sightings). The general path
            then learns each document as if the data were deduplicated, so removal leaves no
            membership trace (docs/privacy.md). Counted per model, across processes. ``0``: no
            sighting of a document with an ID trains the general path, only rows without one (-1)
            do; give IDs to the documents to isolate only (``add_sequence_ids(...,
            repeated_only=True)``), and removal leaves the model trained without them. Rows
            without an ID train the general path, except (counted by content) a repeat of tokens
            seen ``max(K, 1)`` times, which trains nothing.
        sightings_by: what makes a sighting a repeat under ``general_sightings``. ``"ids+content"``
            (default): its ID or its content (a hash of its tokens) seen ``K`` times before, so an
            exact repeat that carries another document's ID (wrong metadata) is still a repeat and
            trains sinks only (docs/noisy_ids.md); with exact IDs both agree. ``"ids"``: the ID alone.
            ``"content"``: the content alone, for IDs shared by several documents (a per-source
            label), which would make every document after an ID's first a repeat; edited copies
            are then first sightings.
        target_modules: module names of one decoder layer's MLP, where discovery cannot find it:
            ``{"mlp": "mlp", "in_proj": ["gate_proj", "up_proj"], "out_proj": "down_proj"}``;
            optional ``"in_proj_chunks"`` (2 for a fused gate+up projection) and ``"width_attr"``
            (the config field holding the MLP width), and ``"norm"``: the MLP's norm over its hidden
            neurons between the projections (BitNet's ``"ffn_sub_norm"``; the sinks are then applied
            at its input). ``"mlp": ""`` means the projections sit on the decoder layer itself.
    """

    sink_fraction: float = 0.3
    sink_active_prob: float = 0.3
    mode: str = "auto"
    layers: list[int] | None = None
    num_sink_neurons: int | None = None
    salt: int = 0
    eval_scaling: str = "none"
    mask_scheme: str = "hash"
    per_layer_masks: bool = False
    require_sequence_ids: bool = True
    init_seed: int = 0
    sink_init: str = "random"
    sink_lr_scale: float = 4.0
    general_sightings: int | None = None
    sightings_by: str = "ids+content"
    target_modules: dict[str, Any] | None = None
    # Written by the patched model when it saves: per-MLP general/sink widths, needed to rebuild
    # the exact structure on load. Users never set it.
    sink_layout: dict[str, Any] | None = field(default=None, repr=False)
    # Written with it: how the model's MLPs were found (hf_memsinks.mlp_discovery.resolve), so that restoring
    # runs no discovery and does not depend on the Transformers version.
    found_mlps: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"MemSinkConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("sink_fraction", "sink_active_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                fail(name, "must be a number strictly between 0 and 1")
            setattr(self, name, float(value))
        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}")
        if self.sink_init not in SINK_INITS:
            fail("sink_init", f"must be one of {SINK_INITS}")
        if isinstance(self.sink_lr_scale, bool) or not isinstance(self.sink_lr_scale, (int, float)) or not (
                1.0 <= self.sink_lr_scale <= 100.0):
            fail("sink_lr_scale", "must be a number from 1 to 100")
        self.sink_lr_scale = float(self.sink_lr_scale)
        if self.general_sightings is not None and (isinstance(self.general_sightings, bool) or not isinstance(
                self.general_sightings, int) or self.general_sightings < 0):
            fail("general_sightings", "must be a non-negative integer or None")
        if self.sightings_by not in SIGHTINGS_BY:
            fail("sightings_by", f"must be one of {SIGHTINGS_BY}")
        if self.eval_scaling not in EVAL_SCALINGS:
            fail("eval_scaling", f"must be one of {EVAL_SCALINGS}")
        if self.mask_scheme not in MASK_SCHEMES:
            fail("mask_scheme", f"must be one of {MASK_SCHEMES}")
        if self.num_sink_neurons is not None and (
            isinstance(self.num_sink_neurons, bool)
            or not isinstance(self.num_sink_neurons, int)
            or self.num_sink_neurons < 1
        ):
            fail("num_sink_neurons", "must be a positive integer or None")
        if self.layers is not None:
            if isinstance(self.layers, int) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                fail("layers", "must be a list of layer indices or None")
            if len(self.layers) == 0:
                fail("layers", "must name at least one layer (None means all)")
            self.layers = list(self.layers)
        for name in ("salt", "init_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
                fail(name, "must be an integer that fits in int64")
        for name in ("per_layer_masks", "require_sequence_ids"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be True or False")
        if self.mask_scheme == "reference":
            if self.salt != 0:
                fail("salt", "the reference mask scheme has no salt; leave it at 0")
            if self.per_layer_masks:
                fail("per_layer_masks", "the reference mask scheme shares one mask across layers")
        if self.target_modules is not None:
            self._check_target_modules(fail)

    def _check_target_modules(self, fail) -> None:
        tm = self.target_modules
        if not isinstance(tm, dict):
            fail("target_modules",
                 "must be a dict like {'mlp': 'mlp', 'in_proj': ['up_proj'], 'out_proj': 'down_proj'}")
        unknown = set(tm) - TARGET_MODULE_KEYS
        if unknown:
            hints = [repr(k) + did_you_mean(str(k), TARGET_MODULE_KEYS) for k in sorted(unknown, key=str)]
            fail("target_modules", f"unknown keys {', '.join(hints)}; allowed: {sorted(TARGET_MODULE_KEYS)}")
        width_attr = tm.get("width_attr")
        if width_attr is not None and (not isinstance(width_attr, str) or not width_attr.isidentifier()):
            fail("target_modules", "'width_attr' must be the name of a model config field, or None")
        if tm.get("norm") is not None and (not isinstance(tm["norm"], str) or not tm["norm"]):
            fail("target_modules", "'norm' must be the name of the MLP's norm over its hidden neurons, or None")
        if not isinstance(tm.get("out_proj"), str) or not tm["out_proj"]:
            fail("target_modules", "needs 'out_proj': the name of the MLP's output (down) projection")
        in_proj = tm.get("in_proj")
        if isinstance(in_proj, str):
            in_proj = [in_proj]
        if not in_proj or not all(isinstance(n, str) and n for n in in_proj):
            fail("target_modules", "needs 'in_proj': the name(s) of the MLP's input (up/gate) projections")
        chunks = tm.get("in_proj_chunks", 1)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            fail("target_modules", "'in_proj_chunks' must be a positive integer")
        self.target_modules = {
            "mlp": tm.get("mlp", "mlp"),
            "in_proj": list(in_proj),
            "out_proj": tm["out_proj"],
            "in_proj_chunks": chunks,
            "width_attr": tm.get("width_attr"),
            **({"norm": tm["norm"]} if tm.get("norm") is not None else {}),
        }

    @classmethod
    def for_finetuning(cls, **overrides) -> "MemSinkConfig":
        """The recipe for fine-tuning a pretrained model (measured in docs/finetune.md): sinks
        added beside the pretrained neurons, copies of them, each active for few documents, and
        stepping faster than the general neurons, so a repeated document is fitted by its own
        sinks first while the general neurons learn what all documents share."""
        return cls(**{**FINETUNE_RECIPE, **overrides})

    # ---- derived values -------------------------------------------------------------------------

    @property
    def general_eval_scale(self) -> float:
        """Factor on general neurons when sinks are dropped (paper: (p_gen + p_mem) / p_gen)."""
        if self.eval_scaling == "none":
            return 1.0
        p_gen = 1.0 - self.sink_fraction
        return (p_gen + self.sink_active_prob) / p_gen

    def num_sinks_for(self, width: int) -> tuple[int, int]:
        """(general, sinks) for an MLP of hidden width ``width`` before patching (``"auto"``: as
        ``"split"``, what it becomes on a model built from a config)."""
        if self.mode in ("split", "auto"):
            sinks = self.num_sink_neurons if self.num_sink_neurons is not None else round(width * self.sink_fraction)
            general = width - sinks
        else:
            general = width
            sinks = (
                self.num_sink_neurons
                if self.num_sink_neurons is not None
                else round(width * self.sink_fraction / (1.0 - self.sink_fraction))
            )
        if sinks < 1:
            field_name = "num_sink_neurons" if self.num_sink_neurons is not None else "sink_fraction"
            raise ValueError(
                f"MemSinkConfig.{field_name}: gives 0 sink neurons for an MLP of width {width}; "
                "raise sink_fraction or set num_sink_neurons"
            )
        if general < 1:
            field_name = "num_sink_neurons" if self.num_sink_neurons is not None else "sink_fraction"
            raise ValueError(
                f"MemSinkConfig.{field_name}: leaves no general neuron in an MLP of width {width}"
            )
        return general, sinks

    # ---- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("sink_layout", "found_mlps"):
            if out[name] is None:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemSinkConfig":
        data = dict(data)
        data.pop("hf_memsinks_version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            hints = [repr(k) + did_you_mean(k, names) for k in sorted(unknown)]
            raise ValueError(f"MemSinkConfig: unknown fields {', '.join(hints)}; known: {sorted(names)}")
        return cls(**data)

    def to_json_string(self) -> str:
        from .version import __version__

        return json.dumps({**self.to_dict(), "hf_memsinks_version": __version__}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "MemSinkConfig":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a memsink config is a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs) -> "MemSinkConfig":
        """Read ``memsink_config.json`` from a directory, a file path, or a Hub repository."""
        file = find_config_file(path, **hub_kwargs)
        if file is None:
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path!s}: it is not a hf_memsinks checkpoint")
        try:
            with open(file, encoding="utf-8") as f:
                return cls.from_json_string(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON ({err}): this checkpoint's memsink config is corrupt") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{file}: {err}") from None


def find_config_file(path: str | os.PathLike, **hub_kwargs) -> str | None:
    """Path of ``memsink_config.json`` for a local dir/file or Hub repo id, or None if it has none."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, CONFIG_NAME)
        return file if os.path.isfile(file) else None
    from .transformers_internals import hub_file

    return hub_file(path, CONFIG_NAME, **hub_kwargs)
