"""``hf-memsinks``: export a sink-free model from a memsink checkpoint, and audit a directory."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

AUDIT_WORDS = ("sink_weight", "sink_bias", "sink_gate_up_proj", "sink_up_proj", "sink_down_proj", "memsink", "sink_layout", "sink_fraction", "sink_active_prob")


class CLIError(ValueError):
    """A user error: printed as one line on stderr, exit status 2."""


def _json_file(path: str, rel: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"cannot audit {path}: not a readable JSON file ({err})") from None
    return text


def audit(directory: str) -> list[str]:
    """Everything in ``directory`` that betrays sinks: sink tensors, sink config fields, memsink
    metadata files. Empty for a clean export.

    Anything that is not a readable model directory is an error (:class:`CLIError`), never
    "clean": a missing path, a file, a directory without ``config.json`` or without weights, a
    weights or JSON file that cannot be read."""
    from safetensors import safe_open

    if not os.path.exists(directory):
        raise CLIError(f"cannot audit {directory}: no such directory")
    if not os.path.isdir(directory):
        raise CLIError(f"cannot audit {directory}: not a directory")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CLIError(f"cannot audit {directory}: not a model directory (no config.json)")
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
                    raise CLIError(f"cannot audit {path}: not a readable safetensors file ({err})") from None
                weights += 1
                findings += [f"{rel}: sink tensor {k}" for k in keys]
                findings += [f"{rel}: metadata {k}" for k, v in meta.items() if "memsink" in f"{k}{v}".lower()]
            elif name.endswith(".json"):
                text = _json_file(path, rel)
                findings += [f"{rel}: mentions {w!r}" for w in AUDIT_WORDS if w in text and "memsink" not in name]
            elif name.endswith((".bin", ".pt", ".pth", ".ckpt")):
                weights += 1
                findings.append(f"{rel}: pickled weights cannot be audited; export with safetensors")
    if weights == 0:
        raise CLIError(f"cannot audit {directory}: no weights in it (no .safetensors file)")
    return findings


MODEL_CARD = """---
library_name: transformers
tags:
- memsinks
---
# {name}

This model was trained with MemSinks (Ghosal, Maini, Raghunathan, ICML 2025) using
[hf_memsinks](https://github.com/): every training sequence carried a sequence ID that switched on
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
        raise CLIError(f"export: the output {out} is the input checkpoint itself; write the export to another directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"export: the output {out} exists and is not a directory")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise CLIError(
            f"export: the output {out} is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); "
            "pass --overwrite to replace the files an export writes there (other files are kept)"
        )
    if any("memsink" in e.lower() for e in entries):
        raise CLIError(f"export: the output {out} holds a memsink checkpoint (memsink_config.json); an export there "
                       "would not be clean: write it to another directory")


def export(checkpoint: str, out: str, forget_ids: list[int] | None = None, overwrite: bool = False) -> None:
    """The sink-free model of ``checkpoint``, with its tokenizer files and a model card, written
    atomically to ``out`` (:func:`hf_memsinks.saving.atomic_save`). ``out`` must not be the
    checkpoint, and must be empty unless ``overwrite``; files of ``out`` the export does not write
    are kept, never deleted."""
    from .model import AutoMemSinkModelForCausalLM
    from .saving import atomic_save

    _check_export_target(checkpoint, out, overwrite)
    if forget_ids is not None:
        from .ids import check_sequence_ids

        check_sequence_ids(forget_ids, "--forget-ids")
    model = AutoMemSinkModelForCausalLM.from_pretrained(checkpoint)
    cfg = model.memsink_config
    model.remove_sinks(forget_ids=forget_ids)
    how = ("keeping every sink at its expected value except the sinks of sequence IDs "
           f"{forget_ids} (zeroed)") if forget_ids else "with the general neurons kept"
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

    atomic_save(out, write)


def _user_errors() -> tuple[type, ...]:
    errors: list[type] = [ValueError, TypeError, OSError, KeyError, NotImplementedError]
    try:
        import yaml

        errors.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success (audit: clean), 1 audit found traces of sinks, 2 a user error (one
    line on stderr; set HF_MEMSINKS_TRACEBACK=1 for the traceback), 130 interrupted."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("hf-memsinks: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if os.environ.get("HF_MEMSINKS_TRACEBACK"):
            raise
        message = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
        message = " ".join(message.split()) or type(err).__name__
        print(f"hf-memsinks: error: {message}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-memsinks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the sink-free model of a memsink checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--forget-ids", type=int, nargs="+", default=None,
                   help="keep sinks at their expected value except these sequence IDs'")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty output directory: replace the files an export writes, keep the others")
    p = sub.add_parser("audit", help="exit 1, naming what was found, if a directory holds any trace of sinks")
    p.add_argument("directory")
    p = sub.add_parser("run", help="the memorization benchmark: standard / memsinks / dedup / post-hoc, report and plots")
    p.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=200 memsinks.sink_fraction=0.5")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    p = sub.add_parser("sweep", help="memsinks over sink_fraction x sink_active_prob, against one standard run")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--sink-fractions", default="0.1,0.3,0.5")
    p.add_argument("--active-probs", default="0.1,0.3,0.5")
    p.add_argument("--out", default=None)
    p = sub.add_parser("scale", help="memsinks against model size and MLP shape: standard + memsinks per point")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--models", default="2x64,4x128,4x192", help="LAYERSxHIDDEN list, e.g. 2x64,4x128")
    p.add_argument("--mlp-ratios", default="4,16", help="MLP width as multiples of hidden, e.g. 4,16")
    p.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.command in ("run", "sweep", "scale"):
        return _experiment(args)

    if args.command == "export":
        export(args.checkpoint, args.out, args.forget_ids, overwrite=args.overwrite)
        findings = audit(args.out)
        if findings:
            print("\n".join(findings), file=sys.stderr)
            return 1
        print(f"exported a sink-free model to {args.out}")
        return 0
    findings = audit(args.directory)
    if findings:
        print(f"{args.directory}: {len(findings)} trace(s) of sinks:\n  " + "\n  ".join(findings))
        return 1
    print(json.dumps({"directory": args.directory, "clean": True}))
    return 0


def _experiment(args) -> int:
    from pathlib import Path

    from .experiments.config import load_config

    cfg = load_config(args.config, args.overrides)
    name = cfg.name or Path(args.config).stem
    if args.command == "run":
        from .experiments.runner import run
        from .experiments.training import finish_processes

        out = args.out or os.path.join("runs", name)
        report = run(cfg, out)
        if report["processes"]["rank"] == 0:
            print((Path(out) / "report.md").read_text())
            print(f"report.json, report.md, curves.png, tradeoff.png in {out}")
        finish_processes()
        return 0
    if args.command == "scale":
        from .experiments.scale import parse_models, scale

        out = args.out or os.path.join("runs", f"{name}-scale")
        ratios = [int(x) for x in args.mlp_ratios.split(",")]
        points = scale(cfg, out, parse_models(args.models), ratios)
        print((Path(out) / "scale.md").read_text())
        print(f"scale.json, scale.md and scale.png in {out} ({len(points)} points)")
        return 0
    from .experiments.sweep import sweep

    out = args.out or os.path.join("runs", f"{name}-sweep")
    fractions = [float(x) for x in args.sink_fractions.split(",")]
    probs = [float(x) for x in args.active_probs.split(",")]
    result = sweep(cfg, out, fractions, probs)
    print(json.dumps(result["points"], indent=1))
    print(f"sweep.json and sweep.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
