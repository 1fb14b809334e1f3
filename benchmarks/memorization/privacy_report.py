"""report.md's privacy sections: membership-inference AUC and secret exposure per run, and the
forgetting experiment's membership figures with the unlearning baselines."""

from __future__ import annotations

from hf_memsinks.evaluation.membership import ATTACKS

ATTACK_NAMES = {"loss": "loss", "zlib": "zlib", "min_k": "Min-K%", "min_k_plus_plus": "Min-K%++"}


def _f(value) -> str:
    return "-" if value is None else ("nan" if value != value else f"{value:.3f}")


def privacy_lines(report: dict, rows: tuple) -> list[str]:
    """Per run: each attack's AUC (natural / canary [/ secret] / all) and the exposure in bits."""
    m = report["metrics"]
    runs = [(k, name) for k, name in rows if k in m and "mia_auc" in m[k]]
    if not runs:
        return []
    kinds = [k for k in m[runs[0][0]]["mia_auc"]["loss"] if k != "all"]
    exposed = any(m[k].get("exposure") for k, _ in runs)
    cap = next((m[k]["exposure"]["max_exposure"] for k, _ in runs if m[k].get("exposure")), None)
    head = "| run | " + " | ".join(ATTACK_NAMES[a] for a in ATTACKS) + (
        " | exposure, trained secrets (mean / max) | exposure, unseen secrets (mean) |" if exposed else " |")
    lines = ["", "## Membership inference and exposure", "",
             f"ROC AUC of repeated (member) against control (non-member) documents, as {' / '.join(kinds)} / all "
             "(all: pairs within a kind only); 0.5 = the attacker learns nothing, 1 = every member scores above "
             f"every non-member. Min-K% and Min-K%++ average the lowest {report['config']['eval']['mia_k']:.0%} of "
             "token scores." + (f" Exposure in bits, from {report['config']['eval']['exposure_candidates']} sampled "
                                f"candidate secrets (at most {_f(cap)} bits; about 1.44 for a secret never seen)."
                                if exposed else ""), "",
             head, "|---|" + "---|" * (len(ATTACKS) + 2 * exposed)]
    for key, name in runs:
        auc = m[key]["mia_auc"]
        cells = [" / ".join(_f(auc[a][k]) for k in kinds + ["all"]) for a in ATTACKS]
        e = m[key].get("exposure")
        if exposed:
            cells += [f"{_f(e['trained']['mean'])} / {_f(e['trained']['max'])}", _f(e["control"]["mean"])] if e \
                else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def unlearning_lines(report: dict) -> list[str]:
    """The unlearning baselines beside forget_sinks and retraining: cost, extraction, membership, PrivLeak."""
    f = report.get("forgetting")
    if not f:
        return []
    u = report["config"]["forget"]["unlearning"]
    lines = ["", "### Membership of F, and the unlearning baselines", "",
             "Membership AUC of F against the controls of its documents' kinds (loss / zlib / Min-K% / Min-K%++) "
             "and PrivLeak against the model retrained without F ((AUC - AUC_retrained) / AUC_retrained on the "
             "loss attack: 0 = as private as retraining, > 0 still detectable, < 0 over-unlearned). Unlearning "
             f"baselines on the standard model: AdamW at lr {u['lr']}, stopped at the last check (every "
             f"{u['check_every']} steps, at most {u['max_steps']}) where K's loss rose by at most {u['k_budget']} "
             f"nats and the val loss by at most {u['val_budget']:.0%}.", "",
             "| n | model | deleted | served as | loss F | loss K | val loss | extraction F | AUC F | PrivLeak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shown = lambda r: r["method"] in ("standard", "standard retrained without F", *u["methods"]) or (  # noqa: E731
        r.get("deleted") in ("F", "every sink"))
    for r in sorted((r for r in f["rows"] if shown(r)), key=lambda r: r["n"]):
        auc = " / ".join(_f(r["mia_auc_F"][a]) for a in ATTACKS)
        lines.append(f"| {r['n']} | {r['method']} | {r['deleted']} | {r['served']} | {_f(r['loss_F'])} | "
                     f"{_f(r['loss_K'])} | {_f(r['val_loss'])} | {_f(r['extraction_F'])} | {auc} | "
                     f"{_f(r.get('privleak', {}).get('loss'))} |")
    return lines
