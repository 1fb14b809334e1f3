"""What a privacy reviewer measures on each benchmark run: membership-inference AUC of the
repeated documents against the controls (per kind and pooled within kinds), and the exposure of
the secret canaries against never-trained secrets of the same format."""

from __future__ import annotations

import statistics

from hf_memsinks.data.sequence_ids import ids_for_documents
from hf_memsinks.evaluation.exposure import exposure
from hf_memsinks.evaluation.membership import ATTACKS, membership_scores, pooled_auc, roc_auc

from .config import BenchmarkConfig
from .setting import Setting


def scores(model, docs, setting: Setting, cfg: BenchmarkConfig, own_ids: bool = False) -> dict:
    """Every attack's score of ``docs`` (``own_ids``: each with its own sequence ID)."""
    ids = ids_for_documents(docs) if own_ids else None
    return membership_scores(model, docs, sequence_ids=ids, tokenizer=setting.tokenizer, k=cfg.eval.mia_k,
                             batch_size=cfg.eval.batch_size, pad_id=setting.pad_id)


def kinds(setting: Setting) -> dict[str, tuple[list, list]]:
    """Members and non-members of each kind of repeated document the setting has."""
    out = {"natural": (setting.natural, setting.control_natural),
           "canary": (setting.canaries, setting.control_canaries)}
    if setting.secrets:
        out["secret"] = (setting.secrets.docs, setting.control_secrets.docs)
    return {k: v for k, v in out.items() if v[0] and v[1]}


def mia_auc(model, setting: Setting, cfg: BenchmarkConfig, own_ids: bool = False) -> dict:
    """``{attack: {kind: AUC, "all": AUC over within-kind pairs}}``: repeated (members) against
    control (non-members) documents."""
    groups = {kind: (scores(model, rep, setting, cfg, own_ids), scores(model, ctl, setting, cfg, own_ids))
              for kind, (rep, ctl) in kinds(setting).items()}
    out = {}
    for attack in ATTACKS:
        pairs = {kind: (m[attack], n[attack]) for kind, (m, n) in groups.items()}
        out[attack] = {kind: roc_auc(*p) for kind, p in pairs.items()}
        out[attack]["all"] = pooled_auc(list(pairs.values()))
    return out


def forget_mia_auc(model, setting: Setting, cfg: BenchmarkConfig, forget: list, own_ids: bool = False) -> dict:
    """``{attack: AUC}`` of the forget set F against the controls of each F document's kind,
    pooled within kinds (a natural F document is compared with natural controls only)."""
    groups = []
    for rep, ctl in kinds(setting).values():
        members = [d for d in forget if d in rep]
        if members:
            groups.append((scores(model, members, setting, cfg, own_ids), scores(model, ctl, setting, cfg, own_ids)))
    return {attack: pooled_auc([(m[attack], n[attack]) for m, n in groups]) for attack in ATTACKS}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values),
            "values": values}


def secret_exposure(model, setting: Setting, cfg: BenchmarkConfig, own_ids: bool = False) -> dict | None:
    """Exposure (bits) of each trained secret canary and each control secret, by sampling
    ``eval.exposure_candidates`` candidates (the same candidates for every run); None without secrets."""
    if not setting.secrets:
        return None
    out = {}
    for part, secrets in (("trained", setting.secrets), ("control", setting.control_secrets)):
        values, last = [], {}
        for i, (doc, text, value) in enumerate(zip(secrets.docs, secrets.texts, secrets.values)):
            sid = int(ids_for_documents([doc])[0]) if own_ids else None
            last = exposure(model, setting.tokenizer, text, value, candidates=cfg.eval.exposure_candidates,
                            prefix_ids=doc[:1], sequence_id=sid, seed=cfg.seed + 1000 + i,
                            batch_size=cfg.eval.batch_size, pad_id=setting.pad_id)
            values.append(last["exposure"])
        out[part] = _stats(values)
    out.update({k: last[k] for k in ("max_exposure", "candidates", "space", "exact")})
    return out


HEADLINE_RUNS = (("standard", "standard"), ("memsinks_removed", "memsinks"), ("goldfish", "goldfish"),
                 ("dedup", "dedup"), ("memsinks_goldfish_removed", "memsinks_goldfish"))


def headline(metrics: dict) -> dict:
    """Flat summary keys: per run, the strongest attack's AUC (pooled within kinds) and the mean
    exposure of the trained secret canaries."""
    out = {}
    for key, name in HEADLINE_RUNS:
        run = metrics.get(key)
        if not run or "mia_auc" not in run:
            continue
        out[f"{name}_mia_auc"] = max(a["all"] for a in run["mia_auc"].values())
        if run.get("exposure"):
            out[f"{name}_secret_exposure"] = run["exposure"]["trained"]["mean"]
    return out
