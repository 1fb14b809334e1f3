"""``hf-memsinks audit-privacy MODEL DOCS.jsonl CONTROL.jsonl``: what a reviewer would try on a model
before it is published. DOCS are documents it was trained on, CONTROL documents of the same kind
it never saw; the report is each membership attack's ROC AUC (0.5 = nothing leaks) and the share
of documents whose greedy continuation reproduces their text (extraction).

A memsink checkpoint is audited as it would be published: with its sinks removed."""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from ..evaluation.membership import ATTACKS, membership_scores, roc_auc
from ..evaluation.memorization import extraction_hits


def read_jsonl(path: str, text_field: str = "text") -> list[str]:
    """The ``text_field`` of every JSON line of ``path`` (blank lines skipped)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(f"{path}:{number}: no string field {text_field!r} (choose it with --text-field)")
            texts.append(row[text_field])
    if len(texts) < 2:
        raise ValueError(f"{path}: {len(texts)} document(s); the attacks need at least 2")
    return texts


def load_model(model_dir: str):
    """The model and its tokenizer; a memsink checkpoint with its sinks removed. Returns
    ``(model, tokenizer, description)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..transformers_internals import load_kwargs

    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir}: not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if os.path.isfile(os.path.join(model_dir, "memsink_config.json")):
        from ..model.loading import AutoMemSinkModelForCausalLM

        return AutoMemSinkModelForCausalLM.from_pretrained(model_dir).remove_sinks(), tokenizer, \
            "memsink checkpoint, sinks removed"
    return AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs({})), tokenizer, "plain model"


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    docs = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    if tokenizer.bos_token_id is not None and docs and docs[0][:1] != [tokenizer.bos_token_id]:
        docs = [[tokenizer.bos_token_id] + d[: max_length - 1] for d in docs]  # a start token, as in training
    return [d for d in docs if len(d) >= 2]


def audit_privacy(model_dir: str, docs_path: str, control_path: str, *, text_field: str = "text",
                  max_length: int = 512, batch_size: int = 16, k: float = 0.2, prefix: int = 32, suffix: int = 32,
                  progress: bool = True) -> dict:
    """Membership AUC per attack of DOCS (members) against CONTROL (non-members), and the
    extraction rate of each: greedy decoding from a ``prefix``-token prefix reproduces the next
    ``suffix`` tokens (documents shorter than ``prefix + suffix`` are not tried)."""
    model, tokenizer, what = load_model(model_dir)
    model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sides = {"members": _encode(tokenizer, read_jsonl(docs_path, text_field), max_length),
             "controls": _encode(tokenizer, read_jsonl(control_path, text_field), max_length)}
    bar = tqdm(total=2 * sum(len(d) for d in sides.values()), desc="audit-privacy", unit="doc", disable=not progress)
    scores, extraction = {}, {}
    for side, docs in sides.items():
        parts, hits = [], []
        for start in range(0, len(docs), batch_size):
            chunk = docs[start:start + batch_size]
            parts.append(membership_scores(model, chunk, tokenizer=tokenizer, k=k, batch_size=batch_size, pad_id=pad))
            bar.update(len(chunk))
        for start in range(0, len(docs), batch_size):
            chunk = docs[start:start + batch_size]
            hits.append(extraction_hits(model, chunk, prefix, suffix, batch_size=batch_size))
            bar.update(len(chunk))
        scores[side] = {a: torch.cat([p[a] for p in parts]) for a in ATTACKS}
        tried = torch.cat(hits)
        extraction[side] = {"rate": tried.float().mean().item() if tried.numel() else float("nan"),
                            "tried": int(tried.numel())}
    bar.close()
    return {"model": model_dir, "loaded_as": what, "members": len(sides["members"]),
            "controls": len(sides["controls"]), "k": k,
            "auc": {a: roc_auc(scores["members"][a], scores["controls"][a]) for a in ATTACKS},
            "extraction": {"prefix": prefix, "suffix": suffix, **extraction}}


def format_audit(result: dict) -> str:
    """The audit as a few lines a reviewer reads."""
    names = {"loss": "loss", "zlib": "zlib", "min_k": f"Min-K% (k={result['k']:.0%})",
             "min_k_plus_plus": f"Min-K%++ (k={result['k']:.0%})"}
    e = result["extraction"]
    lines = [f"{result['model']} ({result['loaded_as']}): {result['members']} member documents, "
             f"{result['controls']} control documents",
             "membership inference, ROC AUC (0.5 = no leak, 1 = every member detected):"]
    lines += [f"  {names[a]:<22} {auc:.3f}" for a, auc in result["auc"].items()]
    lines.append(f"extraction ({e['prefix']}-token prefix -> next {e['suffix']} tokens exactly): "
                 f"members {e['members']['rate']:.3f} of {e['members']['tried']}, "
                 f"controls {e['controls']['rate']:.3f} of {e['controls']['tried']}")
    return "\n".join(lines)
