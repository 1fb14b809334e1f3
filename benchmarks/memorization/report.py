"""report.md (one table, one line of meaning per metric) and the PNG plots."""

from __future__ import annotations

from pathlib import Path

from .privacy_report import privacy_lines, unlearning_lines

ROWS = (
    ("standard", "standard (no sinks)"),
    ("memsinks_removed", "memsinks, sinks removed"),
    ("memsinks_own_sinks", "memsinks, own sinks on"),
    ("dedup", "dedup"),
    ("goldfish", "goldfish (standard model, Goldfish loss)"),
    ("memsinks_goldfish_removed", "memsinks+goldfish, sinks removed"),
    ("memsinks_goldfish_own_sinks", "memsinks+goldfish, own sinks on"),
    ("forget_memsinks_removed", "memsinks, forgetting regime, sinks removed"),
    ("forget_memsinks_own_sinks", "memsinks, forgetting regime, own sinks on"),
)
COLUMNS = (
    ("val_loss", "val loss"),
    ("repeated_loss_natural", "repeated natural"),
    ("control_loss_natural", "control natural"),
    ("repeated_loss_canary", "repeated canary"),
    ("control_loss_canary", "control canary"),
    ("memorization_gap", "gap"),
    ("extraction_rate", "extraction"),
)
MEANINGS = {
    "gap_closure": ("share of the standard model's memorization gap (control - repeated loss) that removing sinks "
                    "closes; 1 = no memorization left"),
    "gap_closure_natural": "the same, on repeated natural documents only",
    "gap_closure_canary": "the same, on repeated random-token canaries only",
    "val_loss_ratio": "validation loss after sink removal / standard validation loss; the price of removal (1 = free)",
    "own_sinks_repeated_loss": ("repeated-document loss with each document's own sinks on: the memorization is there, "
                                "in the sinks"),
    "own_sinks_to_standard_repeated_loss": ("that loss / the standard model's repeated loss (about 1 or below: sinks "
                                            "hold what standard training memorizes)"),
    "standard_extraction_rate": ("share of repeated documents the standard model reproduces (greedy suffix from a "
                                 "prefix)"),
    "memsinks_extraction_rate": "the same after removing the sinks",
    "goldfish_gap_closure": ("gap closed by the Goldfish loss alone (standard model, 1 target in k dropped by a hash "
                             "of its context)"),
    "goldfish_gap_closure_natural": "the same, natural documents",
    "goldfish_gap_closure_canary": "the same, canaries",
    "goldfish_val_loss_ratio": "Goldfish's validation loss / standard's",
    "goldfish_extraction_rate": "share of repeated documents the Goldfish model reproduces",
    "memsinks_goldfish_gap_closure": "gap closed by memsinks trained with the Goldfish loss, sinks removed",
    "memsinks_goldfish_gap_closure_natural": "the same, natural documents",
    "memsinks_goldfish_gap_closure_canary": "the same, canaries",
    "memsinks_goldfish_val_loss_ratio": "its validation loss / standard's",
    "memsinks_goldfish_extraction_rate": "its extraction rate of repeated documents",
    "forget_regime_gap_closure": "gap closed by removing all sinks of the forgetting regime's memsinks model",
    "forget_regime_gap_closure_natural": "the same, natural documents",
    "forget_regime_gap_closure_canary": "the same, canaries",
    "forget_regime_val_loss_ratio": "its validation loss / standard's",
    "forget_regime_extraction_rate": "its extraction rate of repeated documents, sinks removed",
    "dedup_gap_closure": "gap closed by training on deduplicated data (each repeated document once) instead",
    "dedup_val_loss_ratio": "dedup's validation loss / standard's",
    "posthoc_best_gap_closure": ("best gap closure of the post-hoc neuron-zeroing baseline over its sweep, at any "
                                 "val-loss cost"),
    "posthoc_gap_closure_at_same_val_loss": ("gap closure of the post-hoc baseline at no more val-loss cost than "
                                             "memsinks"),
    "standard_mia_auc": ("the strongest membership attack's ROC AUC on the standard model (repeated against control "
                         "documents, pairs within a kind); 0.5 = no leak"),
    "memsinks_mia_auc": "the same after removing the sinks",
    "goldfish_mia_auc": "the same for the Goldfish model",
    "dedup_mia_auc": "the same for dedup",
    "memsinks_goldfish_mia_auc": "the same for memsinks+goldfish, sinks removed",
    "standard_secret_exposure": "mean exposure (bits) of the trained secret canaries, standard model",
    "memsinks_secret_exposure": "the same after removing the sinks",
    "goldfish_secret_exposure": "the same, Goldfish",
    "dedup_secret_exposure": "the same, dedup",
    "memsinks_goldfish_secret_exposure": "the same, memsinks+goldfish with sinks removed",
}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"
    return str(value)


HEADLINE = (("standard", "standard training", None), ("memsinks_removed", "memsinks, sinks removed", ""),
            ("goldfish", "Goldfish loss", "goldfish_"), ("memsinks_goldfish_removed", "memsinks + Goldfish",
                                                         "memsinks_goldfish_"), ("dedup", "dedup", "dedup_"))


def headline_table(report: dict) -> str:
    """The README's results table for this run: per method, gap closed (natural / canary), val
    ratio, extraction and the strongest membership attack's AUC (sinks removed where they were)."""
    m, s = report["metrics"], report["summary"]
    lines = ["| method | gap closed (natural / canary) | val ratio | extraction | membership AUC |",
             "|---|---|---|---|---|"]
    for key, name, prefix in HEADLINE:
        if key not in m:
            continue
        run, std = m[key], m["standard"]
        closed = [1.0 - run[f"memorization_gap{k}"] / std[f"memorization_gap{k}"] if prefix is not None else 0.0
                  for k in ("", "_natural", "_canary") if f"memorization_gap{k}" in run]
        gap = f"{closed[0]:.3f}" + (f" ({closed[1]:.3f} / {closed[2]:.3f})" if len(closed) == 3 else "")
        auc = max(a["all"] for a in run["mia_auc"].values()) if "mia_auc" in run else None
        lines.append(f"| {name} | {gap} | {run['val_loss'] / std['val_loss']:.3f} | {run['extraction_rate']:.2f} | "
                     f"{_fmt(auc)} |")
    return "\n".join(lines) if "standard" in m and s else ""


def write_markdown(report: dict, out: Path) -> Path:
    m, s = report["metrics"], report["summary"]
    lines = [f"# MemSinks memorization benchmark: {report['config'].get('name', 'run')}", ""]
    st = report["setting"]
    mc = report["memsink_config"]
    lines += [
        f"{report['config']['model']['type']} {report['config']['model']['layers']} layers x "
        f"{report['config']['model']['hidden']}, MLP {report['config']['model']['mlp']} "
        f"({report['model_parameters'] / 1e6:.2f}M parameters); {report['config']['train']['steps']} steps of "
        f"{report['config']['train']['batch_size']} documents ({st['train_tokens']:,} tokens); "
        f"{st['repeated_natural']} natural documents and {st['repeated_canaries']} canaries each repeated "
        f"{report['config']['data']['repetitions']}x; MemSinks sink_fraction {mc['sink_fraction']}, "
        f"sink_active_prob {mc['sink_active_prob']}, sink_lr_scale {mc.get('sink_lr_scale', 1.0)}. "
        f"Total time {report['timings_s'].get('total', 0):.0f} s.",
        "",
        "| run | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for key, name in ROWS:
        if key in m:
            lines.append(f"| {name} | " + " | ".join(_fmt(m[key].get(c)) for c, _ in COLUMNS) + " |")
    for p in report.get("posthoc_sweep", []):
        lines.append(f"| post-hoc, top {p['fraction_removed']:.0%} neurons zeroed | "
                     + " | ".join(_fmt(p.get(c)) for c, _ in COLUMNS) + " |")
    lines += ["", "Losses are mean next-token losses in nats; gap = control - repeated loss; extraction = share of "
              "repeated documents whose greedy continuation of a "
              f"{report['config']['eval']['prefix']}-token prefix reproduces the next "
              f"{report['config']['eval']['suffix']} tokens exactly.", "",
              "| summary | value | meaning |", "|---|---|---|"]
    for key, value in s.items():
        lines.append(f"| {key} | {_fmt(value)} | {MEANINGS.get(key, '')} |")
    lines += privacy_lines(report, ROWS)
    lines += _forgetting_lines(report)
    lines += unlearning_lines(report)
    lines += ["", "Plots: `curves.png` (losses over training), `tradeoff.png` (gap closed against val loss)"
              + (", `forgetting.png` (forgetting F: loss on F and on K)" if report.get("forgetting") else "") + ".", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _forgetting_lines(report: dict) -> list[str]:
    f = report.get("forgetting")
    if not f:
        return []
    regimes = ", ".join(f"`{k}` (sink_fraction {c['sink_fraction']}, sink_active_prob {c['sink_active_prob']})"
                        for k, c in f["regimes"].items())
    lines = ["", "## Forgetting chosen documents", "",
             f"F = the first n repeated documents (canary, natural, canary, ...), K = the {f['keep']} repeated "
             f"documents outside the largest F. Memsinks models: {regimes}. Deleted: the sinks of F's IDs "
             "(`forget_sinks`), of n random never-trained IDs (the control), nothing, or every sink. Served as: "
             "`activate` (each document with its own ID: own sinks on), `expected` (every remaining sink at its "
             "expected value: what "
             "`remove_sinks(forget_ids=...)` exports), `drop` (`remove_sinks()`), `plain` (standard models). "
             f"Val loss on {f.get('val_docs', 'all')} validation documents (in `activate` with each one's own ID).", "",
             "| n | model | deleted | served as | sinks deleted | loss F | loss K | extraction F | extraction K "
             "| val loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(f["rows"], key=lambda r: r["n"]):
        cov = r.get("coverage")
        lines.append(f"| {r['n']} | {r['method']} | {r['deleted']} | {r['served']} | "
                     f"{'-' if cov is None else f'{cov:.0%}'} | " + " | ".join(
                         _fmt(r[c]) for c in ("loss_F", "loss_K", "extraction_F", "extraction_K", "val_loss")) + " |")
    lines += ["", "In `activate` mode (loss rises against nothing deleted; targeted = F rises, K and the random-ID "
              "control do not):", "", "| regime, n | sinks deleted | F rise | F rise, random IDs | K rise | "
              "K rise, random IDs | F extraction (before) | K extraction (before) | F rise / retrain's |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, s in f["summary"].items():
        lines.append(f"| {key} | {s['coverage']:.0%} | {_fmt(s['F_loss_rise'])} "
                     f"| {_fmt(s['F_loss_rise_random_ids'])} | {_fmt(s['K_loss_rise'])} "
                     f"| {_fmt(s['K_loss_rise_random_ids'])} | {_fmt(s['F_extraction'])} "
                     f"({_fmt(s['F_extraction_before'])}) | {_fmt(s['K_extraction'])} "
                     f"({_fmt(s['K_extraction_before'])}) | {_fmt(s.get('F_share_of_retrain_rise'))} |")
    return lines


def write_forgetting_plot(report: dict, out: Path) -> Path | None:
    f = report.get("forgetting")
    if not f:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = f["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    lines = []
    for i, regime in enumerate(f["regimes"]):
        color = ("tab:red", "tab:purple", "tab:orange")[i % 3]
        for deleted, style in (("F", "-"), ("random", "--"), ("nothing", ":")):
            what = {"F": "F's sinks deleted", "random": "random IDs' sinks deleted",
                    "nothing": "nothing deleted"}[deleted]
            lines.append((f"memsinks {regime}, activate, {what}",
                          dict(regime=regime, deleted=deleted, served="activate"), color, style))
    lines.append(("standard retrained without F", dict(method="standard retrained without F"), "tab:green", "-"))
    lines.append(("standard", dict(method="standard"), "black", ":"))
    fractions = sorted({r["fraction_removed"] for r in rows if "fraction_removed" in r})
    if fractions:
        lines.append((f"post-hoc, top {fractions[-1]:.0%} F-specific neurons zeroed",
                      dict(fraction_removed=fractions[-1]), "tab:gray", "-."))
    for ax, key, title in ((axes[0], "loss_F", "loss on F (forgotten documents)"),
                           (axes[1], "loss_K", "loss on K (kept repeated documents)")):
        for name, match, color, style in lines:
            pts = sorted((r["n"], r[key]) for r in rows if all(r.get(k) == v for k, v in match.items()))
            if pts:
                ax.plot(*zip(*pts), style, color=color, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(f["sizes"], [str(n) for n in f["sizes"]])
        ax.set_xlabel("documents forgotten (n)")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "forgetting.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, out: Path) -> list[Path]:
    """``curves.png``, ``tradeoff.png`` and ``forgetting.png``, each where the report has its data."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [write_curves_plot(report, out), write_tradeoff_plot(report, out), write_forgetting_plot(report, out)]
    return [p for p in paths if p]


def write_curves_plot(report: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    curves = report["curves"]
    if not curves:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharex=True)
    titles = (("repeated_loss", "repeated documents"), ("control_loss", "control (never trained on)"),
              ("val_loss", "validation"))
    for ax, (key, title) in zip(axes, titles):
        for name, points in curves.items():
            label = "memsinks (sinks removed)" if name == "memsinks" else name
            ax.plot([p["step"] for p in points], [p[key] for p in points], label=label, marker=".")
        ax.set_title(f"loss on {title}")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tradeoff_plot(report: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    m = report["metrics"]
    if "standard" not in m:
        return None
    std = m["standard"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))

    def point(run):
        return run["val_loss"] / std["val_loss"], 1 - run["memorization_gap"] / std["memorization_gap"]

    sweep = report.get("posthoc_sweep", [])
    if sweep:
        xs, ys = zip(*[(1.0, 0.0)] + [point(p) for p in sweep])
        ax.plot(xs, ys, "o-", color="tab:gray", label="post-hoc neuron zeroing (sweep)")
        for p, x, y in zip(sweep, xs[1:], ys[1:]):
            ax.annotate(f"{p['fraction_removed']:.0%}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.plot([1.0], [0.0], "s", color="black", label="standard")
    for key, style, label in (("dedup", dict(marker="^", color="tab:green", markersize=9), "dedup"),
                              ("goldfish", dict(marker="D", color="tab:orange", markersize=8), "goldfish"),
                              ("memsinks_goldfish_removed", dict(marker="P", color="tab:purple", markersize=10),
                               "memsinks+goldfish, sinks removed"),
                              ("memsinks_removed", dict(marker="*", color="tab:red", markersize=14),
                               "memsinks, sinks removed")):
        if key in m:
            ax.plot(*point(m[key]), linestyle="none", label=label, **style)
    return save_tradeoff(fig, ax, "Removing memorization: what it closes and what it costs", out / "tradeoff.png")


def save_tradeoff(fig, ax, title: str, path: Path) -> Path:
    """Axes, legend and file of a gap-closed-against-val-loss plot (the report's and the sweep's)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("val loss / standard val loss (lower is better)")
    ax.set_ylabel("memorization gap closed (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
