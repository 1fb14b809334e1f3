"""Memorization metrics of one benchmark run: what ``measure`` reads off a model on the setting's
documents, and the summary of all runs against the standard model (gap closed, val-loss ratio)."""

from __future__ import annotations

from typing import Any

import torch

from hf_memsinks.data.sequence_ids import ids_for_documents
from hf_memsinks.evaluation.memorization import document_losses, extraction_hits

from .config import BenchmarkConfig
from .privacy import headline, mia_auc, secret_exposure
from .setting import Setting


def doc_losses(model, docs, cfg: BenchmarkConfig, pad_id: int, own_ids: bool = False) -> torch.Tensor:
    """Each document's mean loss (``own_ids``: with its own sequence ID)."""
    ids = ids_for_documents(docs) if own_ids else None
    return document_losses(model, docs, ids, batch_size=cfg.eval.batch_size, pad_id=pad_id)


def extraction_rate(model, docs, cfg: BenchmarkConfig, own_ids: bool = False) -> float:
    """Share of ``docs`` whose greedy continuation of ``eval.prefix`` tokens reproduces the next
    ``eval.suffix`` exactly (NaN when none is long enough)."""
    e = cfg.eval
    hits = extraction_hits(model, docs, e.prefix, e.suffix, ids_for_documents(docs) if own_ids else None, e.batch_size)
    return hits.float().mean().item() if hits.numel() else float("nan")


def measure(model, setting: Setting, cfg: BenchmarkConfig, own_ids: bool = False) -> dict:
    """Validation loss, and per kind of repeated document (natural, canary) repeated and control
    loss, memorization gap and extraction rate; the membership-inference AUCs (``mia_auc``) and,
    with secret canaries, their ``exposure`` (privacy.py). ``own_ids``: each document runs with its own ID
    (own sinks on; the model in ``"activate"`` mode)."""
    def losses(docs):
        return doc_losses(model, docs, cfg, setting.pad_id, own_ids)

    def extraction(docs):
        return extraction_rate(model, docs, cfg, own_ids)

    out: dict[str, Any] = {"val_loss": losses(setting.validation).mean().item()}
    parts = {"natural": (setting.natural, setting.control_natural),
             "canary": (setting.canaries, setting.control_canaries)}
    rep_all, ctl_all = [], []
    for kind, (rep_docs, ctl_docs) in parts.items():
        if not rep_docs:
            continue
        rep, ctl = losses(rep_docs), losses(ctl_docs)
        rep_all.append(rep)
        ctl_all.append(ctl)
        out[f"repeated_loss_{kind}"] = rep.mean().item()
        out[f"control_loss_{kind}"] = ctl.mean().item()
        out[f"memorization_gap_{kind}"] = out[f"control_loss_{kind}"] - out[f"repeated_loss_{kind}"]
        out[f"extraction_rate_{kind}"] = extraction(rep_docs)
        out[f"control_extraction_rate_{kind}"] = extraction(ctl_docs)
    out["repeated_loss"] = torch.cat(rep_all).mean().item()
    out["control_loss"] = torch.cat(ctl_all).mean().item()
    out["memorization_gap"] = out["control_loss"] - out["repeated_loss"]
    n = {k: len(v[0]) for k, v in parts.items()}
    hits = sum(out.get(f"extraction_rate_{k}", 0.0) * n[k] for k in n if n[k])
    out["extraction_rate"] = hits / max(1, sum(n.values()))
    out["mia_auc"] = mia_auc(model, setting, cfg, own_ids)
    if setting.secrets and cfg.eval.exposure_candidates:
        out["exposure"] = secret_exposure(model, setting, cfg, own_ids)
    return out


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through ``points`` (sorted by x); None outside it."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def summarize(metrics: dict) -> dict:
    """The headline numbers: gap closed and val-loss ratio of each method against ``standard``,
    extraction rates, and the post-hoc baseline at memsinks' val-loss cost."""
    std = metrics["standard"]
    out: dict[str, Any] = {}

    def closure(run: dict, suffix: str = "") -> float:
        return 1.0 - run[f"memorization_gap{suffix}"] / std[f"memorization_gap{suffix}"]

    if "memsinks_removed" in metrics:
        ms = metrics["memsinks_removed"]
        out["gap_closure"] = closure(ms)
        for kind in ("natural", "canary"):
            if f"memorization_gap_{kind}" in ms:
                out[f"gap_closure_{kind}"] = closure(ms, f"_{kind}")
        out["val_loss_ratio"] = ms["val_loss"] / std["val_loss"]
        own = metrics["memsinks_own_sinks"]
        out["own_sinks_repeated_loss"] = own["repeated_loss"]
        out["own_sinks_to_standard_repeated_loss"] = own["repeated_loss"] / std["repeated_loss"]
    for key, name in (("goldfish", "goldfish"), ("memsinks_goldfish_removed", "memsinks_goldfish"),
                      ("forget_memsinks_removed", "forget_regime")):
        if key in metrics:
            out[f"{name}_gap_closure"] = closure(metrics[key])
            for kind in ("natural", "canary"):
                if f"memorization_gap_{kind}" in metrics[key]:
                    out[f"{name}_gap_closure_{kind}"] = closure(metrics[key], f"_{kind}")
            out[f"{name}_val_loss_ratio"] = metrics[key]["val_loss"] / std["val_loss"]
            out[f"{name}_extraction_rate"] = metrics[key]["extraction_rate"]
    if "memsinks_removed" in metrics:
        out["memsinks_extraction_rate"] = metrics["memsinks_removed"]["extraction_rate"]
    out["standard_extraction_rate"] = std["extraction_rate"]
    if "dedup" in metrics:
        out["dedup_gap_closure"] = closure(metrics["dedup"])
        out["dedup_val_loss_ratio"] = metrics["dedup"]["val_loss"] / std["val_loss"]
    sweep = metrics.get("posthoc_sweep")
    if sweep:
        points = [(1.0, 0.0)] + [(p["val_loss"] / std["val_loss"], closure(p)) for p in sweep]
        out["posthoc_best_gap_closure"] = max(closure(p) for p in sweep)
        if "val_loss_ratio" in out:
            # best closure the baseline reaches at no more val-loss cost than memsinks
            ok = [c for r, c in points if r <= out["val_loss_ratio"]]
            at = _interpolate(points, out["val_loss_ratio"])
            # (memsinks at or below the standard val loss: removing nothing, closure 0, is all it may do)
            out["posthoc_gap_closure_at_same_val_loss"] = max(ok + ([at] if at is not None else []), default=0.0)
    out.update(headline(metrics))
    return out
