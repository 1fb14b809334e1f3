"""``hf-memsinks``: the command line. Each command is one call into the library: ``export``
(:mod:`hf_memsinks.export`), ``audit`` (:mod:`hf_memsinks.publishing.audit`), ``audit --git-push`` and
``install-hook`` (:mod:`hf_memsinks.publishing.git_hook`), ``check-ids`` (:mod:`hf_memsinks.data.id_check`),
``audit-privacy`` (:mod:`.audit_privacy`). The memorization benchmark has its own:
``python -m benchmarks.memorization``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..export import export
from ..publishing.audit import AuditFailed, audit

USER_ERRORS: tuple[type, ...] = (ValueError, TypeError, OSError, KeyError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success (audit: clean), 1 audit found traces of sinks, 2 a user error (one
    line on stderr; set HF_MEMSINKS_TRACEBACK=1 for the traceback), 130 interrupted."""
    return guarded(_main, argv, "hf-memsinks")


def guarded(command, argv: list[str] | None, prog: str, errors: tuple[type, ...] = ()) -> int:
    """``command(argv)``, with a user error (``errors`` too) as one line on stderr and status 2."""
    try:
        from safetensors import SafetensorError

        errors = (*errors, SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    try:
        return command(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (*USER_ERRORS, *errors) as err:
        if os.environ.get("HF_MEMSINKS_TRACEBACK"):
            raise
        message = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
        message = " ".join(message.split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-memsinks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the sink-free model of a memsink checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--forget-ids", type=int, nargs="+", default=None,
                   help="keep sinks at their expected value except these sequence IDs'")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty output directory: replace the files an export writes, keep the others")
    p = sub.add_parser("audit", help="exit 1, naming what was found, if a directory holds any trace of sinks; "
                       "run it before any upload that does not import hf_memsinks (`hf upload`)")
    p.add_argument("directory")
    p.add_argument("--git-push", metavar="REMOTE", default=None,
                   help="DIRECTORY is a git repository and stdin git's pre-push input: check what the push to "
                        "REMOTE would send (the hook of install-hook runs this)")
    p = sub.add_parser("install-hook", help="a git pre-push hook in a repository that refuses pushes carrying sinks")
    p.add_argument("repo", nargs="?", default=".")
    p = sub.add_parser("check-ids", help="before training: do a dataset's IDs agree on its repeated rows, and which "
                       "add_sequence_ids(by=...) to use")
    p.add_argument("dataset", help="a folder written by save_to_disk, a .jsonl/.json/.csv/.parquet file, or a Hub "
                   "dataset name")
    p.add_argument("--ids-column", default="sequence_ids", help="the column of IDs or metadata (absent: no IDs yet)")
    p.add_argument("--text-column", default="text", help="texts or token lists whose repeats the IDs should follow")
    p.add_argument("--split", default="train")
    p.add_argument("--threshold", type=float, default=0.5, help="Jaccard similarity of near-duplicate rows")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("audit-privacy", help="membership-inference AUCs and extraction of a model on documents it "
                       "was trained on against control documents it never saw")
    p.add_argument("model", help="model directory (with its tokenizer); a memsink checkpoint is audited sink-free")
    p.add_argument("docs", help="JSONL of training documents (members)")
    p.add_argument("control", help="JSONL of documents of the same kind never trained on")
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=float, default=0.2, help="Min-K%% and Min-K%%++: share of least likely tokens")
    p.add_argument("--prefix", type=int, default=32)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.command == "audit-privacy":
        return _audit_privacy(args)
    if args.command == "check-ids":
        return _check_ids(args)

    if args.command == "export":
        try:
            export(args.checkpoint, args.out, args.forget_ids, overwrite=args.overwrite)
        except AuditFailed as err:  # audited in staging: nothing was put at args.out
            print(f"hf-memsinks: export failed its audit; {args.out} was left as it was:\n  "
                  + "\n  ".join(err.findings), file=sys.stderr)
            return 1
        print(f"exported a sink-free model to {args.out}")
        return 0
    if args.command == "install-hook":
        from ..publishing.git_hook import install_hook

        print(f"installed {install_hook(args.repo)}: a push that would carry sinks is refused")
        return 0
    if args.git_push is not None:
        return _audit_push(args)
    findings = audit(args.directory)
    if findings:
        print(f"{args.directory}: {len(findings)} trace(s) of sinks:\n  " + "\n  ".join(findings))
        return 1
    print(json.dumps({"directory": args.directory, "clean": True}))
    return 0


def _audit_push(args) -> int:
    from ..publishing.git_hook import pushed_traces
    from ..publishing.upload_gate import SINKS_UPLOAD_CONSENT

    traces = pushed_traces(args.directory, sys.stdin.read().splitlines(), args.git_push or None)
    if not traces:
        return 0
    listed = "\n  ".join(traces)
    print(f"hf-memsinks: push refused: it would publish memorized training data held by the sinks:\n  {listed}\n"
          "Push the sink-free model instead (`hf-memsinks export CHECKPOINT OUT`, then commit OUT). A private copy "
          "with sinks goes up with huggingface_hub, not git: hf_memsinks.allow_sinks_upload(repo_id, "
          f"{SINKS_UPLOAD_CONSENT!r}) checks that the repository is private. See docs/publishing.md", file=sys.stderr)
    return 1


def _check_ids(args) -> int:
    from ..data.id_check import check_ids

    result = check_ids(_load_dataset(args.dataset, args.split), args.ids_column, args.text_column,
                       threshold=args.threshold)
    print(json.dumps(result.to_dict(), indent=1) if args.json else str(result))
    return 0


def _load_dataset(source: str, split: str):
    """A saved dataset folder, a data file, or a Hub dataset's split."""
    import datasets

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        loaded = datasets.load_from_disk(source)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    formats = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext not in formats:
            raise ValueError(f"{source}: not a .jsonl, .json, .csv or .parquet file")
        return datasets.load_dataset(formats[ext], data_files=source, split="train")
    if os.path.exists(source) or ext in formats:
        raise ValueError(f"{source}: neither a file nor a folder written by save_to_disk")
    return datasets.load_dataset(source, split=split)


def _audit_privacy(args) -> int:
    from .audit_privacy import audit_privacy, format_audit

    result = audit_privacy(args.model, args.docs, args.control, text_field=args.text_field, max_length=args.max_length,
                           batch_size=args.batch_size, k=args.k, prefix=args.prefix, suffix=args.suffix)
    print(json.dumps(result, indent=1) if args.json else format_audit(result))
    return 0

