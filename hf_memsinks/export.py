"""Export a sink-free model from a memsink checkpoint (``hf-memsinks export``), and audit a
directory for any trace of sinks (``hf-memsinks audit``)."""

from __future__ import annotations

import json
import os
import shutil

from .checkpoints.atomic import atomic_save
from .checkpoints.content import inspect
from .ids.validation import check_sequence_ids
from .model.loading import AutoMemSinkModelForCausalLM

AUDIT_WORDS = ("sink_weight", "sink_bias", "sink_gate_up_proj", "sink_up_proj", "sink_down_proj", "memsink",
               "sink_layout", "sink_fraction", "sink_active_prob")


class ExportError(ValueError):
    """An input that ``export`` or ``audit`` cannot use (the CLI prints it as one line, exit status 2)."""


class AuditFailed(ExportError):
    """An export whose staged files still betray sinks; it was not put in place (exit status 1)."""

    def __init__(self, directory: str, findings: list[str]):
        super().__init__(f"the export to {directory} failed its audit and was not written: " + "; ".join(findings[:5]))
        self.findings = findings


def write_audited(directory: str, target: str, write) -> None:
    """``write(directory)`` into a staging directory, then :func:`audit` it there: an export that
    fails raises :class:`AuditFailed` before it replaces anything (``atomic_save`` drops the staging)."""
    write(directory)
    findings = audit(directory)
    if findings:
        raise AuditFailed(target, findings)


def _json_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"cannot audit {path}: not a readable JSON file ({err})") from None
    return text


def audit(directory: str) -> list[str]:
    """Everything in ``directory`` that betrays sinks: sink tensors, sink config fields, memsink
    metadata files, and in any other file what the upload gate would find in it (sink tensors in a
    renamed file, an archive or a pickle). Empty for a clean export.

    Anything that is not a readable model directory is an error (:class:`ExportError`), never
    "clean": a missing path, a file, a directory without ``config.json`` or without weights, a
    weights or JSON file that cannot be read."""
    from safetensors import safe_open

    if not os.path.exists(directory):
        raise ExportError(f"cannot audit {directory}: no such directory")
    if not os.path.isdir(directory):
        raise ExportError(f"cannot audit {directory}: not a directory")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ExportError(f"cannot audit {directory}: not a model directory (no config.json)")
    findings = []
    weights = 0
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if "memsink" in name.lower():
                findings.append(f"{rel}: memsink metadata file")
            if name.endswith(".safetensors"):
                try:
                    with safe_open(path, framework="pt") as f:
                        keys = [k for k in f.keys() if ".sink_" in k]
                        meta = f.metadata() or {}
                except Exception as err:  # safetensors raises its own error types
                    raise ExportError(f"cannot audit {path}: not a readable safetensors file ({err})") from None
                weights += 1
                findings += [f"{rel}: sink tensor {k}" for k in keys]
                findings += [f"{rel}: metadata {k}" for k, v in meta.items() if "memsink" in f"{k}{v}".lower()]
            elif name.endswith(".json"):
                text = _json_file(path)
                findings += [f"{rel}: mentions {w!r}" for w in AUDIT_WORDS if w in text and "memsink" not in name]
            elif name.endswith((".bin", ".pt", ".pth", ".ckpt")):
                weights += 1
                findings.append(f"{rel}: pickled weights cannot be audited; export with safetensors")
            else:  # judged by what it holds, as the upload gate does: renamed weights, archives, pickles
                found = inspect(rel, path)
                weights += any(f.kind == "tensors" and f.where == rel for f in found)
                findings += _content_findings(rel, found)
    if weights == 0:
        raise ExportError(f"cannot audit {directory}: no weights in it (no .safetensors file)")
    return findings


def _content_findings(rel: str, found) -> list[str]:
    out = []
    for f in found:
        if f.kind == "tensors":
            out += [f"{f.where}: sink tensor {k}" for k in f.detail if ".sink_" in k]
        elif f.kind == "keys":
            out += [f"{f.where}: pickled {k}" for k in f.detail]
        elif f.kind == "memsink" and f.where != rel:  # (the file's own name is reported above)
            out.append(f"{f.where}: memsink metadata file")
        elif f.kind == "unreadable":
            out.append(f"{f.where}: cannot be checked for sinks ({f.detail})")
    return out


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
    (:class:`AuditFailed`) replaces nothing."""

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
