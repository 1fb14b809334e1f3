"""``python -m benchmarks.memorization noisy-ids``: MemSinks with sequence IDs as users have them,
against one standard run.

The benchmark gives every repetition of a document exactly its own ID. Real IDs are not like that,
so each condition trains a memsinks model on the same stream with other IDs:

- ``noise q``: each repetition keeps its document's ID with probability 1 - q, else takes the ID of
  another training document, drawn at random (wrong metadata);
- ``missing s``: a share s of the distinct documents, all their repetitions, have no ID (-1);
- ``coarse k``: k documents share one ID (a per-source label), the groups drawn at random;
- near-duplicate repeats: every repetition is a lightly edited copy (``edits`` tokens substituted
  by draws from the corpus' unigram distribution, at other places in every copy), with IDs from
  the content of each copy (``content``: every copy its own), from MinHash clusters of the copies
  (``near_duplicates``, as ``add_sequence_ids`` computes them) or the true document
  (``metadata``). Their gap is measured against a standard model trained on the edited stream,
  on the originals and on one edited copy of each.

Every condition reports ``gap_closure`` and ``val_loss_ratio`` under ``summary.id_conditions``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
from pathlib import Path

import torch

from hf_memsinks.config import MemSinkConfig
from hf_memsinks.data.sequence_ids import add_sequence_ids, stable_id
from hf_memsinks.model.add_sinks import get_memsink_model

from .config import BenchmarkConfig
from .metrics import measure
from .report import save_tradeoff
from .setting import Setting, build_setting, unigram_counts
from .training import build_model, make_accelerator, train

MIN_GAP = 0.1  # nats: a smaller standard gap makes a closure ratio meaningless


def true_ids(stream: list[list[int]]) -> list[int]:
    """Each position's document ID: the content hash of the document (exact repeats share it)."""
    return [stable_id(doc) for doc in stream]


def noisy(ids: list[int], q: float, seed: int) -> list[int]:
    """Each position keeps its ID with probability ``1 - q``, else takes another document's."""
    rng = random.Random(seed)
    distinct = sorted(set(ids))
    out = []
    for i in ids:
        if rng.random() < q:
            other = rng.choice(distinct)
            while other == i and len(distinct) > 1:
                other = rng.choice(distinct)
            i = other
        out.append(i)
    return out


def missing(ids: list[int], share: float, seed: int) -> list[int]:
    """A share of the distinct documents (every repetition of each) without an ID (-1)."""
    rng = random.Random(seed)
    distinct = sorted(set(ids))
    dropped = set(rng.sample(distinct, round(share * len(distinct))))
    return [-1 if i in dropped else i for i in ids]


def coarse(ids: list[int], k: int, seed: int) -> list[int]:
    """Random groups of ``k`` distinct documents share one ID (that of the group's first)."""
    distinct = sorted(set(ids))
    random.Random(seed).shuffle(distinct)
    group = {doc: distinct[(n // k) * k] for n, doc in enumerate(distinct)}
    return [group[i] for i in ids]


def edited_stream(setting: Setting, edits: int, seed: int) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """The stream with every repetition of a repeated document replaced by an edited copy.

    Returns the new stream, each position's true document ID, and one edited copy per repeated
    document (for measuring, in the order of ``setting.repeated``)."""
    g = torch.Generator().manual_seed(seed + 11)
    counts = unigram_counts(setting.stream, len(setting.tokenizer), setting.tokenizer.eos_token_id)
    repeated = {tuple(d): n for n, d in enumerate(setting.repeated)}
    stream, ids, first_copy = [], [], [None] * len(setting.repeated)
    for doc in setting.stream:
        n = repeated.get(tuple(doc))
        ids.append(stable_id(doc))
        if n is None:
            stream.append(doc)
            continue
        copy_ = list(doc)
        places = torch.randperm(len(doc) - 1, generator=g)[:edits] + 1  # never the start token
        for place, token in zip(places.tolist(), torch.multinomial(counts, edits, replacement=True, generator=g)):
            copy_[place] = int(token)
        stream.append(copy_)
        if first_copy[n] is None:
            first_copy[n] = copy_
    return stream, ids, first_copy


def near_duplicate_ids(stream: list[list[int]], **kwargs) -> list[int]:
    """The IDs ``add_sequence_ids(by="near_duplicates")`` gives the stream's token lists."""
    from datasets import Dataset

    ds = add_sequence_ids(Dataset.from_dict({"input_ids": stream}), by="near_duplicates", column="input_ids",
                          **kwargs)
    return ds["sequence_ids"]


def cluster_counts(truth: list[int], given: list[int], setting: Setting) -> dict:
    """How the IDs ``given`` to the stream split the repeated documents' copies (ideal: one ID per
    document) and merge other documents into them (ideal: none)."""
    repeated = {stable_id(d) for d in setting.repeated}
    per_doc: dict[int, set] = {}
    for t, g in zip(truth, given):
        if t in repeated:
            per_doc.setdefault(t, set()).add(g)
    theirs = set().union(*per_doc.values()) if per_doc else set()
    merged = {t for t, g in zip(truth, given) if t not in repeated and g in theirs}
    counts = sorted(len(v) for v in per_doc.values())
    return {"ids_per_repeated_document_median": counts[len(counts) // 2] if counts else 0,
            "ids_per_repeated_document_max": counts[-1] if counts else 0,
            "other_documents_sharing_their_ids": len(merged)}


def with_copies(setting: Setting, copies: list[list[int]]) -> Setting:
    """The setting whose repeated documents are the originals and one edited copy of each."""
    k = len(setting.natural)
    return dataclasses.replace(setting, natural=setting.natural + copies[:k], canaries=setting.canaries + copies[k:])


def conditions(ids: list[int], noise: list[float], missing_shares: list[float], coarse_ks: list[int],
               seed: int) -> dict[str, list[int]]:
    """The exact-repeat conditions: name -> the stream's IDs."""
    out = {"exact IDs": ids}
    out.update({f"noise q={q}": noisy(ids, q, seed) for q in noise})
    out.update({f"missing {s:.0%}": missing(ids, s, seed) for s in missing_shares})
    out.update({f"coarse k={k}": coarse(ids, k, seed) for k in coarse_ks})
    return out


def noisy_ids(cfg: BenchmarkConfig, out_dir: str | os.PathLike, noise: list[float], missing_shares: list[float],
              coarse_ks: list[int], edits: int, near_duplicates: dict | None = None) -> dict:
    """Every condition's memsinks run against its standard run; report.json and a plot in ``out_dir``."""
    accelerator = make_accelerator(cfg)
    setting = build_setting(cfg)
    base = build_model(cfg, len(setting.tokenizer), setting.max_length).to(accelerator.device)

    def trained(stream, ids, label):
        """A standard model (``ids`` None) or a memsinks one trained on ``stream``, sinks removed."""
        model = copy.deepcopy(base)
        if ids is not None:
            model = get_memsink_model(model, MemSinkConfig(**cfg.memsinks))
        train(model, setting, stream, cfg, with_ids=False if ids is None else ids, label=label,
              accelerator=accelerator)
        return model if ids is None else model.remove_sinks()

    runs: dict[str, dict] = {}
    std = measure(trained(setting.stream, None, "standard"), setting, cfg)
    runs["standard"] = std
    for name, ids in conditions(true_ids(setting.stream), noise, missing_shares, coarse_ks, cfg.seed).items():
        runs[name] = _against(measure(trained(setting.stream, ids, name), setting, cfg), std)
    summary: dict = {"edits_per_copy": edits}
    if edits:  # (0: no near-duplicate conditions)
        stream, ids, copies = edited_stream(setting, edits, cfg.seed)
        both = with_copies(setting, copies)
        std_edited = measure(trained(stream, None, "standard, edited repeats"), both, cfg)
        runs["standard, edited repeats"] = std_edited
        policies = {"content": true_ids(stream),
                    "near_duplicates": near_duplicate_ids(stream, **(near_duplicates or {})), "metadata": ids}
        strict = near_duplicate_ids(stream, threshold=0.8, shingle_size=5)
        summary["clusters"] = {name: cluster_counts(ids, policy_ids, setting) for name, policy_ids in
                               {**policies, "near_duplicates, threshold 0.8, 5-token shingles": strict}.items()}
        for policy, policy_ids in policies.items():
            name = f"edited repeats, by={policy}"
            runs[name] = _against(measure(trained(stream, policy_ids, name), both, cfg), std_edited)
    closures = {name: {"gap_closure": r["gap_closure"], "val_loss_ratio": r["val_loss_ratio"]}
                for name, r in runs.items() if "gap_closure" in r}
    summary["id_conditions"] = closures
    if edits:
        summary["near_duplicates_to_exact"] = (closures["edited repeats, by=near_duplicates"]["gap_closure"]
                                               / closures["exact IDs"]["gap_closure"])
    report = {"summary": summary, "runs": runs, "config": cfg.to_dict(),
              "conditions": {"noise": noise, "missing": missing_shares, "coarse": coarse_ks, "edits": edits,
                             "near_duplicates": near_duplicates or {}}}
    if accelerator.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (out / "report.md").write_text(markdown(report))
        _plot(summary["id_conditions"], out / "noisy_ids.png")
    return report


def _against(run: dict, std: dict) -> dict:
    """``run`` with its gap closure (overall, natural, canary) and val-loss ratio against ``std``."""
    out = dict(run)
    out["gap_closure"] = 1 - run["memorization_gap"] / std["memorization_gap"]
    for kind in ("natural", "canary"):  # (None where the standard model shows no gap to close)
        gap = std[f"memorization_gap_{kind}"]
        out[f"gap_closure_{kind}"] = 1 - run[f"memorization_gap_{kind}"] / gap if gap > MIN_GAP else None
    out["val_loss_ratio"] = run["val_loss"] / std["val_loss"]
    return out


def markdown(report: dict) -> str:
    lines = ["| ID condition | gap closed | natural | canary | val ratio | extraction |", "|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        if "gap_closure" in r:
            parts = " | ".join("n/a" if r[f"gap_closure_{k}"] is None else f"{r[f'gap_closure_{k}']:.3f}"
                               for k in ("natural", "canary"))
            lines.append(f"| {name} | {r['gap_closure']:.3f} | {parts} | {r['val_loss_ratio']:.3f} | "
                         f"{r['extraction_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def _plot(points: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot([p["val_loss_ratio"] for p in points.values()], [p["gap_closure"] for p in points.values()], "o",
            label="memsinks, sinks removed")
    for name, p in points.items():
        ax.annotate(name, (p["val_loss_ratio"], p["gap_closure"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    save_tradeoff(fig, ax, "MemSinks with noisy, coarse and near-duplicate IDs", path)
