"""The audit: everything in a directory that betrays sinks (``hf-memsinks audit``), and the audited
write that every export goes through (:func:`write_audited`: ``hf-memsinks export``,
``MemSinkCallback(export_dir=...)``). A file is judged by what it holds (:mod:`.content`), as the
upload gate judges an upload."""

from __future__ import annotations

import json
import os

from .content import inspect

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

    A PEFT adapter folder (``adapter_config.json``) is audited the same way: with hf_memsinks its
    weights hold the sinks of a patched model (:mod:`hf_memsinks.integrations.adapter_files`).
    Anything that is not a readable model or adapter directory is an error (:class:`ExportError`),
    never "clean": a missing path, a file, a directory without ``config.json`` (or
    ``adapter_config.json``) or without weights, a weights or JSON file that cannot be read."""
    from safetensors import safe_open

    if not os.path.exists(directory):
        raise ExportError(f"cannot audit {directory}: no such directory")
    if not os.path.isdir(directory):
        raise ExportError(f"cannot audit {directory}: not a directory")
    if not any(os.path.isfile(os.path.join(directory, f)) for f in ("config.json", "adapter_config.json")):
        raise ExportError(f"cannot audit {directory}: not a model directory (no config.json, nor a PEFT "
                          "adapter's adapter_config.json)")
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
