"""MemSinkConfig: the settings a user chooses (what to patch, how sinks behave), with a JSON round-trip.

A plain dataclass (like PEFT's ``LoraConfig``): each field carries its help and its check
(:mod:`.checks`), so a bad value fails where it was written, with the field's name in the message.
The published code's switches are one field (:mod:`.reference`); what a checkpoint records about its
layout is no setting (:mod:`hf_memsinks.checkpoints.layout_record`), though it is saved in the same file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

from .checks import (
    boolean,
    did_you_mean,
    fail,
    int64,
    int_from,
    int_or_none,
    layer_list,
    mlp_module_names,
    number_from,
    one_of,
    probability,
    setting,
    validate,
)
from .files import CONFIG_NAME, RECORD_KEYS, config_file_text, read_config_file
from .reference import OURS, REFERENCE_SWITCHES, PaperReference, reference_or_none

MODES = ("auto", "split", "add")
SINK_INITS = ("random", "copy")
SINK_OPTIMIZERS = ("adamw", "rowwise")
SIGHTINGS_BY = ("ids+content", "ids", "content")

# MemSinkConfig.for_finetuning(): the recipe the fine-tuning benchmark (configs/finetune.yaml) measured best.
# (compute_active_sinks_only: with 5% of the sinks active the training step costs about what the full fine-tune's does)
FINETUNE_RECIPE = {"mode": "add", "sink_fraction": 0.5, "sink_active_prob": 0.05, "sink_init": "copy",
                   "sink_lr_scale": 7.0, "compute_active_sinks_only": True}


@dataclass
class MemSinkConfig:
    """How to turn a model's MLP neurons into general neurons plus memorization sinks.

    Each field's meaning is in its help (``dataclasses.fields(MemSinkConfig)[i].metadata["help"]``)
    and in docs/guide.md#memsinkconfig. Fine-tuning a pretrained model: :meth:`for_finetuning`.
    """

    sink_fraction: float = setting(0.3, probability, help=(
        "share of each patched MLP's hidden width that is sinks (paper: 1 - p_gen). In 'split' mode the sinks "
        "are carved out of the existing width; in 'add' mode new sink neurons are appended so that they make "
        "up this share of the new width."))
    sink_active_prob: float = setting(0.3, probability, help=(
        "chance that a sink is active for a given sequence ID (paper: p_mem)."))
    mode: str = setting("auto", one_of(MODES), help=(
        "'split' (train from scratch, the paper's setting), 'add' (append sinks to a pretrained model; new "
        "sinks start with zero output weights so outputs are unchanged) or 'auto' (the default): 'split' for "
        "a model built from a config, and an error naming for_finetuning() for one that holds pretrained "
        "weights (split mode would turn part of its pretrained neurons into sinks, which remove_sinks "
        "deletes)."))
    layers: list[int] | dict[int, float] | None = setting(None, layer_list, help=(
        "decoder-layer indices that get sinks (negative indices count from the end); None patches every "
        "layer. A dict maps each index to that layer's own sink_fraction, e.g. {0: 2/3, -1: 0.5}: wide "
        "sinks where a document's memorization is keyed, narrower ones elsewhere (docs/finetune.md)."))
    num_sink_neurons: int | None = setting(None, int_or_none(1, "must be a positive integer or None"), help=(
        "exact number of sinks per patched MLP; overrides sink_fraction."))
    salt: int = setting(0, int64, help=(
        "mixed into the mask hash; a different salt gives an independent set of masks."))
    require_sequence_ids: bool = setting(True, boolean, help=(
        "if True a training forward without sequence_ids is an error; if False it trains the general "
        "neurons only (sinks inactive), e.g. for unlabeled data."))
    init_seed: int = setting(0, int64, help=(
        "seed of the generator that initialises new sink neurons in 'add' mode, so every process builds "
        "the same weights."))
    sink_init: str = setting("random", one_of(SINK_INITS), help=(
        "how 'add' mode initialises the new sinks' input weights: 'random' (drawn like the existing ones) or "
        "'copy' (copies of randomly chosen pretrained neurons: features that already fit the text, so a sink "
        "can fit a document as fast as the general neurons). Output weights start at zero either way."))
    sink_lr_scale: float = setting(4.0, number_from(1, 100), help=(
        "the sink neurons' step as a multiple of the optimizer's (1: the same step). Default 4: a repeated "
        "document's loss falls on whichever neurons fit it fastest, so faster sinks take the memorization "
        "the general neurons would otherwise keep (docs/isolation.md). Applied by an optimizer hook that "
        "every Trainer attaches (MemSinkSFTTrainer too); a training loop of your own calls "
        "hf_memsinks.attach_sink_lr (training without it warns once)."))
    sink_optimizer: str = setting("adamw", one_of(SINK_OPTIMIZERS), help=(
        "what steps the sinks: 'adamw' (default), the training's own optimizer; 'rowwise', a rule that "
        "keeps one value per sink neuron and moves only the neurons a batch's IDs activated, so the "
        "optimizer keeps no state for the sinks (8 fewer bytes per sink weight than AdamW). With it, "
        "patching stores every projection's sinks apart from its general neurons, parameters of their own "
        "(hf_memsinks.layers.sink_parts): in a full fine-tune the general neurons keep the optimizer's "
        "state, and under LoRA hf_memsinks.train_sinks trains the sinks alone. Not for mixture-of-experts "
        "MLPs (hf_memsinks.integrations.rowwise_sinks, docs/performance.md)."))
    general_sightings: int | None = setting(None, int_or_none(0, "must be a non-negative integer or None"),
                                            help=(
        "the privacy setting. None (the paper's method): every repetition of a document trains the general "
        "neurons and its sinks. K: only the first K sightings of each sequence ID train the general path, "
        "with no sink on; every later one trains that ID's sinks alone, all else frozen for it "
        "(hf_memsinks.sightings). The general path then learns each document as if the data were "
        "deduplicated, so removal leaves no membership trace (docs/privacy.md). Counted per model, across "
        "processes. 0: no sighting of a document with an ID trains the general path, only rows without one "
        "(-1) do; give IDs to the documents to isolate only (add_sequence_ids(..., repeated_only=True)), "
        "and removal leaves the model trained without them. Rows without an ID train the general path, "
        "except (counted by content) a repeat of tokens seen max(K, 1) times, which trains nothing. Not under "
        "FSDP (its sharded optimizer state dict raises on the counts)."))
    sinks_from_sighting: int = setting(1, int_from(1, "must be an integer >= 1"), help=(
        "the sighting of a sequence ID from which its sinks switch on. 1 (the paper's method): from the "
        "first. K: its first K-1 sightings train the general path with no sink on, as rows without an ID do; "
        "every later one trains the general path and its sinks together. A document seen once then leaves "
        "its sinks untouched: it has nothing to isolate, and what its sinks would learn from it (what the "
        "whole domain shares) removal would take away (docs/finetune.md#sinks-from-the-second-sighting). "
        "Counted as general_sightings counts (sightings_by, across processes, saved with the optimizer's "
        "state; hf_memsinks.sightings.later_sinks): a sighting is one row (or a packed row's stretch of one "
        "ID), so a document cut into rows that share an ID has its sinks on from its second chunk. Not "
        "under FSDP."))
    sightings_by: str = setting("ids+content", one_of(SIGHTINGS_BY), help=(
        "what makes a sighting a repeat under general_sightings and sinks_from_sighting. 'ids+content' "
        "(default): its ID or its content (a hash of its tokens) seen K times before, so an exact repeat that "
        "carries another document's ID (wrong metadata) is still a repeat and trains sinks only "
        "(docs/noisy_ids.md); with exact IDs both agree. 'ids': the ID alone. 'content': the content alone, "
        "for IDs shared by several documents (a per-source label), which would make every document after an "
        "ID's first a repeat; edited copies are then first sightings."))
    target_modules: dict[str, Any] | None = setting(None, mlp_module_names, help=(
        "module names of one decoder layer's MLP, where discovery cannot find it: {'mlp': 'mlp', 'in_proj': "
        "['gate_proj', 'up_proj'], 'out_proj': 'down_proj'}; optional 'in_proj_chunks' (2 for a fused "
        "gate+up projection) and 'width_attr' (the config field holding the MLP width), and 'norm': the "
        "MLP's norm over its hidden neurons between the projections (BitNet's 'ffn_sub_norm'; the sinks are "
        "then applied at its input). 'mlp': '' means the projections sit on the decoder layer itself."))
    compute_active_sinks_only: bool = setting(False, boolean, help=(
        "in a training forward, compute per row only the sinks its IDs activate (gathered weights and a "
        "batched matmul) instead of every sink then masked: the same result, cheaper when few sinks are "
        "active (hf_memsinks.layers.active_sinks). On in for_finetuning()."))
    reference: PaperReference | None = setting(None, reference_or_none, help=(
        "the published code's switches (eval_scaling, mask_scheme, per_layer_masks), to reproduce the paper: "
        "PaperReference.published(), or PaperReference(...) for some of them. None (a PaperReference equal "
        "to ours becomes None): ours. Read them as config.eval_scaling, config.mask_scheme, "
        "config.per_layer_masks."))

    def __post_init__(self) -> None:
        validate(self)
        if isinstance(self.layers, dict) and self.num_sink_neurons is not None:
            fail(self, "num_sink_neurons", "sets every layer's sinks; with per-layer sink fractions in layers, "
                 "leave it None")
        if isinstance(self.layers, dict) and self.eval_scaling != "none":
            fail(self, "layers", "per-layer sink fractions have no single eval scale; use the eval_scaling "
                 "'none' (ours)")
        if self.general_sightings is not None and self.sinks_from_sighting != 1:
            fail(self, "sinks_from_sighting", "general_sightings already decides which sightings have sinks on "
                 "(its first K none, every later one only its sinks); leave sinks_from_sighting at 1 with it")
        if self.mask_scheme == "reference" and self.salt != 0:
            fail(self, "salt", "the reference mask scheme has no salt; leave it at 0")

    def __setstate__(self, state: dict) -> None:
        """Unpickling (a pickled patched model holds its config): one pickled before the split, with the
        switches and the layout record as fields, becomes today's."""
        state = {k: v for k, v in state.items() if k not in RECORD_KEYS}
        moved = {k: state.pop(k) for k in REFERENCE_SWITCHES if k in state}
        self.__dict__.update({"reference": reference_or_none(moved or None), **state})

    @classmethod
    def for_finetuning(cls, **overrides) -> "MemSinkConfig":
        """The recipe for fine-tuning a pretrained model (measured in docs/finetune.md): sinks
        added beside the pretrained neurons, copies of them, each active for few documents, and
        stepping faster than the general neurons, so a repeated document is fitted by its own
        sinks first while the general neurons learn what all documents share."""
        return cls(**{**FINETUNE_RECIPE, **overrides})

    # ---- the published code's switches, read through ``reference`` ---------------------------------

    @property
    def eval_scaling(self) -> str:
        return (self.reference or OURS).eval_scaling

    @property
    def mask_scheme(self) -> str:
        return (self.reference or OURS).mask_scheme

    @property
    def per_layer_masks(self) -> bool:
        return (self.reference or OURS).per_layer_masks

    # ---- derived values -------------------------------------------------------------------------

    @property
    def general_eval_scale(self) -> float:
        """Factor on general neurons when sinks are dropped (paper: (p_gen + p_mem) / p_gen)."""
        if self.eval_scaling == "none":
            return 1.0
        p_gen = 1.0 - self.sink_fraction
        return (p_gen + self.sink_active_prob) / p_gen

    def layer_fractions(self, num_layers: int) -> dict[int, float]:
        """``{layer: its own sink_fraction}`` (0-based, of ``num_layers``) where ``layers`` is a dict,
        else empty; an index and its negative twin naming one layer is an error."""
        if not isinstance(self.layers, dict):
            return {}
        fractions = {index + num_layers if index < 0 else index: f for index, f in self.layers.items()}
        if len(fractions) < len(self.layers):
            raise ValueError(f"MemSinkConfig.layers names one of this model's {num_layers} layers twice "
                             f"({sorted(self.layers)}), each with its own sink_fraction")
        return fractions

    def sink_fraction_for(self, layer: int, num_layers: int) -> float:
        """The sink_fraction of decoder layer ``layer`` (0-based) of ``num_layers``: its own where
        ``layers`` is a dict, else ``sink_fraction``."""
        return self.layer_fractions(num_layers).get(layer, self.sink_fraction)

    def num_sinks_for(self, width: int, fraction: float | None = None) -> tuple[int, int]:
        """(general, sinks) for an MLP of hidden width ``width`` before patching (``"auto"``: as
        ``"split"``, what it becomes on a model built from a config); ``fraction``: the layer's own
        sink_fraction (:meth:`sink_fraction_for`), by default ``sink_fraction``."""
        fraction = self.sink_fraction if fraction is None else fraction
        if self.mode in ("split", "auto"):
            sinks = self.num_sink_neurons if self.num_sink_neurons is not None else round(width * fraction)
            general = width - sinks
        else:
            general = width
            sinks = (
                self.num_sink_neurons
                if self.num_sink_neurons is not None
                else round(width * fraction / (1.0 - fraction))
            )
        field_name = "num_sink_neurons" if self.num_sink_neurons is not None else "sink_fraction"
        if sinks < 1:
            raise ValueError(
                f"MemSinkConfig.{field_name}: gives 0 sink neurons for an MLP of width {width}; "
                "raise sink_fraction or set num_sink_neurons"
            )
        if general < 1:
            raise ValueError(f"MemSinkConfig.{field_name}: leaves no general neuron in an MLP of width {width}")
        return general, sinks

    # ---- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values; ``reference`` only when set."""
        out = dataclasses.asdict(self)
        if out["reference"] is None:
            del out["reference"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemSinkConfig":
        """The inverse of :meth:`to_dict`; also reads the form checkpoints saved before
        :class:`PaperReference` (its switches at top level), and skips the layout record's keys."""
        data = {k: v for k, v in data.items() if k not in RECORD_KEYS and k != "hf_memsinks_version"}
        flat = {k: data.pop(k) for k in REFERENCE_SWITCHES if k in data}
        if flat and "reference" in data:
            raise ValueError(f"MemSinkConfig: {sorted(flat)} belong inside 'reference'; give them there only")
        if flat:
            data["reference"] = flat
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            hints = [repr(k) + did_you_mean(k, names) for k in sorted(unknown)]
            raise ValueError(f"MemSinkConfig: unknown fields {', '.join(hints)}; known: {sorted(names)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return config_file_text(self.to_dict())

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
        """Read ``memsink_config.json`` from a directory, a file path, or a Hub repository (a checkpoint's
        layout record in it is skipped)."""
        file, data = read_config_file(path, **hub_kwargs)
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{file}: {err}") from None


def _refusing_moved_keywords(init):
    """``MemSinkConfig(eval_scaling=...)`` (before :class:`PaperReference`) fails naming the new spelling."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        moved = {k: kwargs[k] for k in REFERENCE_SWITCHES if k in kwargs}
        if moved:
            given = ", ".join(f"{k}={v!r}" for k, v in moved.items())
            raise TypeError(f"MemSinkConfig({given}): the published code's switches ({', '.join(REFERENCE_SWITCHES)}) "
                            f"are one field now; write MemSinkConfig(reference=PaperReference({given})), or "
                            "PaperReference.published() for all of its settings")
        init(self, *args, **kwargs)
    return __init__


MemSinkConfig.__init__ = _refusing_moved_keywords(MemSinkConfig.__init__)


