"""``python -m benchmarks.memorization``: the memorization benchmark's commands (``run``, ``finetune``,
``repetition``, ``sweep``, ``scale``, ``attribute``, ``noisy-ids``), each a YAML config of :mod:`.config` plus
``dotted.key=value`` overrides; the Makefile's experiment targets call them."""

from __future__ import annotations

import argparse
import json
import os

import yaml

from hf_memsinks.cli.main import guarded

PROG = "python -m benchmarks.memorization"


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success, 2 a user error (one line on stderr), 130 interrupted."""
    return guarded(_main, argv, PROG, (yaml.YAMLError,))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, example: str = "configs/demo.yaml") -> argparse.ArgumentParser:
        """A command on one YAML config with ``dotted.key=value`` overrides and a run directory."""
        p = sub.add_parser(name, help=summary)
        p.add_argument("config", help=f"YAML file, e.g. {example}")
        p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=200 memsinks.sink_fraction=0.5")
        p.add_argument("--out", default=None, help="run directory (default runs/<config name>[-<command>])")
        return p

    command("run", "the memorization benchmark: standard, memsinks, dedup, post-hoc, goldfish, memsinks+goldfish, "
            "forgetting; report and plots")
    command("finetune", "the fine-tuning benchmark: pretrain a base, fine-tune it on another domain with repeated "
            "private documents, per method; report", "configs/finetune.yaml")
    p = command("sweep", "memsinks over sink_fraction x sink_active_prob, against one standard run")
    p.add_argument("--sink-fractions", default="0.1,0.3,0.5")
    p.add_argument("--active-probs", default="0.1,0.3,0.5")
    p = command("scale", "memsinks against model size and MLP shape: standard + memsinks per point")
    p.add_argument("--models", default="2x64,4x128,4x192", help="LAYERSxHIDDEN list, e.g. 2x64,4x128")
    p.add_argument("--mlp-ratios", default="4,16", help="MLP width as multiples of hidden, e.g. 4,16")
    command("attribute", "where the canaries' gap left after sink removal lives: components swapped with a twin "
            "trained without the canaries")
    command("repetition", "where repetition is worth something: a repeated domain from scratch, or a fine-tune's "
            "epochs; one seed per call", "configs/repetition_domain.yaml")
    p = sub.add_parser("repetition-table", help="the table of several repetition runs (one per seed)")
    p.add_argument("runs", nargs="+", help="run directories, each with a report.json")
    p.add_argument("--out", required=True, help="the markdown file to write (and its .json beside it)")
    p = command("noisy-ids", "memsinks with noisy, missing, coarse and near-duplicate sequence IDs")
    p.add_argument("--noise", default="0.1,0.3,0.5", help="shares of repetitions given another document's ID")
    p.add_argument("--missing", default="0.3", help="shares of documents without an ID")
    p.add_argument("--coarse", default="4,16", help="documents per shared ID")
    p.add_argument("--edits", type=int, default=3, help="tokens substituted in each near-duplicate copy")
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "finetune":
        return _finetune(args)
    if args.command in ("repetition", "repetition-table"):
        return _repetition(args)
    return _experiment(args)


def _experiment(args) -> int:
    from pathlib import Path

    from .config import load_config
    from .training import finish_processes

    cfg = load_config(args.config, args.overrides)
    name = cfg.name or Path(args.config).stem
    if args.command == "run":
        from .report import headline_table
        from .runner import run

        out = args.out or os.path.join("runs", name)
        report = run(cfg, out)
        seconds = report["timings_s"]["total"]
        text = [headline_table(report), f"\n{seconds / 60:.1f} min; every table in {Path(out) / 'report.md'}. "
                f"report.json, report.md, curves.png, tradeoff.png in {out}"]
    elif args.command == "scale":
        from .scale import parse_models, scale

        out = args.out or os.path.join("runs", f"{name}-scale")
        ratios = [int(x) for x in args.mlp_ratios.split(",")]
        points = scale(cfg, out, parse_models(args.models), ratios)
        text = [(Path(out) / "scale.md").read_text() if _is_main_process() else "",
                f"scale.json, scale.md and scale.png in {out} ({len(points)} points)"]
    elif args.command == "attribute":
        from .attribution import attribute, markdown

        out = args.out or os.path.join("runs", f"{name}-attribution")
        text = [markdown(attribute(cfg, out)), f"attribution.json and attribution.md in {out}"]
    elif args.command == "noisy-ids":
        from .noisy_ids import markdown, noisy_ids

        out = args.out or os.path.join("runs", f"{name}-noisy-ids")
        report = noisy_ids(cfg, out, _floats(args.noise), _floats(args.missing),
                           [int(x) for x in args.coarse.split(",") if x], args.edits)
        text = [markdown(report), f"report.json, report.md and noisy_ids.png in {out}"]
    else:
        from .sweep import sweep

        out = args.out or os.path.join("runs", f"{name}-sweep")
        fractions = [float(x) for x in args.sink_fractions.split(",")]
        probs = [float(x) for x in args.active_probs.split(",")]
        result = sweep(cfg, out, fractions, probs)
        text = [json.dumps(result["points"], indent=1), f"sweep.json and sweep.png in {out}"]
    if _is_main_process():
        print("\n".join(text))
    finish_processes()
    return 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _finetune(args) -> int:
    from pathlib import Path

    from .finetune import run_finetune
    from .finetune_config import load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides)
    out = args.out or os.path.join("runs", cfg.name or Path(args.config).stem)
    run_finetune(cfg, out)
    print((Path(out) / "report.md").read_text() + f"\nreport.json and report.md in {out}")
    return 0


def _repetition(args) -> int:
    from pathlib import Path

    from .repetition import combine, load_repetition_config, run_repetition

    if args.command == "repetition-table":
        print(combine(args.runs, args.out) + f"\n{args.out} and its .json")
        return 0
    cfg = load_repetition_config(args.config, args.overrides)
    out = args.out or os.path.join("runs", f"{cfg.name or Path(args.config).stem}-seed{cfg.seed}")
    run_repetition(cfg, out)
    print((Path(out) / "report.md").read_text() + f"\nreport.json, report.md and rows.jsonl in {out}")
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
