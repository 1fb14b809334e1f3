"""Export a sink-free model from a memsink checkpoint (``hf-memsinks export``), written through
the audit of :mod:`hf_memsinks.publishing.audit`."""

from __future__ import annotations

import os
import shutil

from .checkpoints.atomic import atomic_save
from .ids.validation import check_sequence_ids
from .model.loading import AutoMemSinkModelForCausalLM
from .publishing.audit import ExportError, write_audited

MODEL_CARD = """---
library_name: transformers
tags:
- memsinks
---
# {name}

This model was trained with MemSinks (Ghosal, Maini, Raghunathan, ICML 2025) using
hf_memsinks: every training sequence carried a sequence ID that switched on
its own subset of extra "sink" neurons in each MLP, so that memorization of repeated sequences
collects there. **The sink neurons were removed** before export, {how}.

The checkpoint is a plain `{arch}` model: load it with `AutoModelForCausalLM.from_pretrained`; it
holds no sink tensor and its config no sink field.

Training setting: sink_fraction={sink_fraction}, sink_active_prob={sink_active_prob},
mode={mode}, eval_scaling={eval_scaling}, mask_scheme={mask_scheme}.
"""


def _check_export_target(checkpoint: str, out: str, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an output that would lose data."""
    same = os.path.realpath(checkpoint) == os.path.realpath(out) or (
        os.path.exists(checkpoint) and os.path.exists(out) and os.path.samefile(checkpoint, out))
    if same:
        raise ExportError(f"export: the output {out} is the input checkpoint itself; "
                       "write the export to another directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"export: the output {out} exists and is not a directory")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise ExportError(
            f"export: the output {out} is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); "
            "pass --overwrite to replace the files an export writes there (other files are kept)"
        )
    if any("memsink" in e.lower() for e in entries):
        raise ExportError(f"export: the output {out} holds a memsink checkpoint (memsink_config.json); an export there "
                       "would not be clean: write it to another directory")


def export(checkpoint: str, out: str, forget_ids: list[int] | None = None, overwrite: bool = False) -> None:
    """The sink-free model of ``checkpoint``, with its tokenizer files and a model card, written
    atomically to ``out`` (:func:`hf_memsinks.checkpoints.atomic.atomic_save`). ``out`` must not be the
    checkpoint, and must be empty unless ``overwrite``; files of ``out`` the export does not write
    are kept, never deleted. The export is audited in its staging directory: one that fails
    (:class:`~hf_memsinks.publishing.audit.AuditFailed`) replaces nothing."""

    _check_export_target(checkpoint, out, overwrite)
    if forget_ids is not None:
        check_sequence_ids(forget_ids, "--forget-ids")
    model = AutoMemSinkModelForCausalLM.from_pretrained(checkpoint)
    cfg = model.memsink_config
    model.remove_sinks(forget_ids=forget_ids)
    how = ("keeping every sink at its expected value except the sinks of "
           f"{len(set(forget_ids))} forgotten sequence IDs, zeroed (IDs are derived from the documents, "
           "so they are not listed)") if forget_ids else "with the general neurons kept"
    card = MODEL_CARD.format(name=os.path.basename(os.path.abspath(out)), how=how,
                             arch=type(model).__name__, **{k: getattr(cfg, k) for k in (
                                 "sink_fraction", "sink_active_prob", "mode", "eval_scaling", "mask_scheme")})

    def write(directory: str) -> None:
        model.save_pretrained(directory)
        for name in os.listdir(checkpoint) if os.path.isdir(checkpoint) else []:
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or name == "chat_template.jinja":
                shutil.copy(os.path.join(checkpoint, name), os.path.join(directory, name))
        with open(os.path.join(directory, "README.md"), "w") as f:
            f.write(card)

    atomic_save(out, lambda directory: write_audited(directory, out, write))
