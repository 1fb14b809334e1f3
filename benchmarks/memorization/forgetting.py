"""Forgetting chosen documents, measured: forget F (the first 1, 4, 16 of the repeated documents,
canaries and natural ones alternating), keep K (the repeated documents outside the largest F),
and compare where memorized content lives.

For a memsinks model: delete the sinks of F's IDs (``forget_sinks``) or, as the control, of as
many random never-trained IDs, then measure F, K and validation loss and extraction

- ``activate``: each document served with its own ID (its own sinks on), where the memorization
  is; the model a provider serving per-document IDs would run;
- ``expected``: every remaining sink at its expected value, IDs not needed: what
  ``remove_sinks(forget_ids=...)`` exports;
- ``drop`` (the library's default and ``remove_sinks()``): every sink gone, for reference.

Baselines: the standard model as trained (nothing forgotten), a standard model retrained on the
same stream with F's occurrences replaced by fresh documents (the gold standard; one retrain
without the largest F, which holds every smaller F), post-hoc zeroing of the standard
model's MLP neurons most specific to F, and post-hoc unlearning of F by gradient ascent, gradient
difference and NPO (unlearning.py), each stopped at a stated K and val-loss cost.

Every row has the membership AUC of F against the controls (``mia_auc_F``, per attack) and, where
there is a retrained model, MUSE's PrivLeak against it (``privleak``, evaluation.membership.privleak).
"""

from __future__ import annotations

import copy
import random
import warnings

import torch

from hf_memsinks.data.sequence_ids import ids_for_documents
from hf_memsinks.evaluation.membership import privleak
from hf_memsinks.model.forgetting import expected_coverage

from .metrics import doc_losses, extraction_rate
from .posthoc import neuron_specificity, zero_top_neurons
from .privacy import forget_mia_auc
from .unlearning import METHODS, unlearn


def forget_order(setting, seed: int) -> list[list[int]]:
    """The repeated documents in forgetting order: a canary, a natural one, a canary, ..."""
    rng = random.Random(seed + 7)
    nat, can = list(setting.natural), list(setting.canaries)
    rng.shuffle(nat)
    rng.shuffle(can)
    order = []
    for i in range(max(len(nat), len(can))):
        order += can[i:i + 1] + nat[i:i + 1]
    return order


def random_ids(n: int, seed: int) -> torch.Tensor:
    """``n`` IDs no training document has (random 62-bit integers)."""
    g = torch.Generator().manual_seed(seed + 11)
    return torch.randint(1, 2**62, (n,), generator=g, dtype=torch.long)


def _row(model, setting, cfg, forget, keep, own_ids: bool, **info) -> dict:
    pad = setting.pad_id
    val_docs = setting.validation[: cfg.forget.val_docs or len(setting.validation)]
    return {**info, "loss_F": doc_losses(model, forget, cfg, pad, own_ids).mean().item(),
            "loss_K": doc_losses(model, keep, cfg, pad, own_ids).mean().item(),
            "extraction_F": extraction_rate(model, forget, cfg, own_ids),
            "extraction_K": extraction_rate(model, keep, cfg, own_ids),
            "val_loss": doc_losses(model, val_docs, cfg, pad, own_ids).mean().item(),
            "mia_auc_F": forget_mia_auc(model, setting, cfg, forget, own_ids)}


def evaluate_memsinks(model, setting, cfg, sets: dict[int, list], keep: list, regime: str, seed: int) -> list[dict]:
    """Rows for one memsinks model: nothing deleted, F's sinks deleted, random IDs' sinks deleted."""
    p = model.memsink_config.sink_active_prob
    rows = []
    for n, forget in sets.items():
        base = dict(method=f"memsinks {regime}", regime=regime, n=n, sink_active_prob=p)
        with model.sink_mode("drop"):
            rows.append(_row(model, setting, cfg, forget, keep, False, deleted="every sink", served="drop",
                             coverage=1.0, **base))
        for mode in ("activate", "expected"):
            with model.sink_mode(mode):
                rows.append(_row(model, setting, cfg, forget, keep, mode == "activate", deleted="nothing",
                                 served=mode, coverage=0.0, **base))
        for deleted, ids in (("F", ids_for_documents(forget)), ("random", random_ids(n, seed))):
            m = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # high coverage is what the table shows
                coverage = m.forget_sinks(ids)
            for mode in ("activate", "expected"):
                with m.sink_mode(mode):
                    rows.append(_row(m, setting, cfg, forget, keep, mode == "activate", deleted=deleted,
                                     served=mode, coverage=coverage,
                                     expected_coverage=expected_coverage(n, p), **base))
    return rows


def evaluate_standard(standard, retrained, setting, cfg, sets: dict[int, list], keep: list,
                      fractions: list[float]) -> list[dict]:
    rows = []
    for n, forget in sets.items():
        rows.append(_row(standard, setting, cfg, forget, keep, False, method="standard", deleted="nothing",
                         served="plain", n=n))
        if retrained is not None:
            rows.append(_row(retrained, setting, cfg, forget, keep, False, method="standard retrained without F",
                             deleted="F (retrained)", served="plain", n=n))
        if fractions:
            scores = neuron_specificity(standard, forget, setting.general_sample, setting.pad_id)
            for fraction in fractions:
                pruned = zero_top_neurons(standard, scores, fraction)
                rows.append(_row(pruned, setting, cfg, forget, keep, False, method="post-hoc zeroing aimed at F",
                                 deleted=f"top {fraction:.0%} F-specific neurons", served="plain", n=n,
                                 fraction_removed=fraction))
    for n, forget in sets.items():  # (after the rows above, which keep their places in the report)
        rows += unlearning_rows(standard, setting, cfg, forget, keep, n)
    return rows


def unlearning_rows(standard, setting, cfg, forget: list, keep: list, n: int) -> list[dict]:
    """One row per ``forget.unlearning.methods`` entry: the standard model with F unlearned."""
    val_docs = setting.validation[: cfg.forget.val_docs or len(setting.validation)]
    retain = keep + setting.general_sample
    rows = []
    for method in cfg.forget.unlearning.methods:
        model, info = unlearn(standard, method, forget, keep, retain, val_docs, setting, cfg)
        rows.append(_row(model, setting, cfg, forget, keep, False, method=method,
                         deleted=f"F unlearned ({info['steps']} steps, stopped: {info['stopped']})", served="plain",
                         n=n, **info))
    return rows


def add_privleak(rows: list[dict]) -> list[dict]:
    """``privleak`` per attack on every row of an n that has a retrained row, against it."""
    retrained = {r["n"]: r for r in rows if r["method"] == "standard retrained without F"}
    for r in rows:
        ref = retrained.get(r["n"])
        if ref is not None:
            r["privleak"] = {a: privleak(auc, ref["mia_auc_F"][a]) for a, auc in r["mia_auc_F"].items()}
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per memsinks regime and n, in ``activate`` mode: how much forgetting F raises F's loss and
    K's, against deleting random IDs, and how far F gets towards the retrained model."""
    out: dict = {}
    find = lambda **kw: next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)  # noqa: E731
    for r in rows:
        if r.get("deleted") != "F" or r.get("served") != "activate":
            continue
        n, regime = r["n"], r["regime"]
        before = find(regime=regime, n=n, deleted="nothing", served="activate")
        rand = find(regime=regime, n=n, deleted="random", served="activate")
        retrained = find(method="standard retrained without F", n=n)
        s = {
            "sink_active_prob": r["sink_active_prob"],
            "coverage": r["coverage"],
            "F_loss_rise": r["loss_F"] - before["loss_F"],
            "F_loss_rise_random_ids": rand["loss_F"] - before["loss_F"],
            "K_loss_rise": r["loss_K"] - before["loss_K"],
            "K_loss_rise_random_ids": rand["loss_K"] - before["loss_K"],
            "F_extraction": r["extraction_F"], "F_extraction_before": before["extraction_F"],
            "K_extraction": r["extraction_K"], "K_extraction_before": before["extraction_K"],
        }
        if retrained is not None and retrained["loss_F"] != before["loss_F"]:
            s["F_share_of_retrain_rise"] = s["F_loss_rise"] / (retrained["loss_F"] - before["loss_F"])
        out[f"{regime} n={n}"] = s
    return out


def summarize_baselines(rows: list[dict]) -> dict:
    """Per unlearning method and n: what unlearning F cost and bought against the standard model
    (F and K loss rises, val-loss ratio, F's extraction and membership AUC, PrivLeak)."""
    out = {}
    standard = {r["n"]: r for r in rows if r["method"] == "standard"}
    for r in rows:
        std = standard.get(r["n"])
        if r["method"] not in METHODS or std is None:
            continue
        out[f"{r['method']} n={r['n']}"] = {
            "steps": r["steps"], "stopped": r["stopped"],
            "F_loss_rise": r["loss_F"] - std["loss_F"], "K_loss_rise": r["loss_K"] - std["loss_K"],
            "val_loss_ratio": r["val_loss"] / std["val_loss"], "F_extraction": r["extraction_F"],
            "mia_auc_F": r["mia_auc_F"], **({"privleak": r["privleak"]} if "privleak" in r else {})}
    return out
