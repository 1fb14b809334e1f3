"""report.md (one table, one line of meaning per metric) and the PNG plots."""

from __future__ import annotations

from pathlib import Path

ROWS = (
    ("standard", "standard (no sinks)"),
    ("memsinks_removed", "memsinks, sinks removed"),
    ("memsinks_own_sinks", "memsinks, own sinks on"),
    ("dedup", "dedup"),
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
    "gap_closure": "share of the standard model's memorization gap (control - repeated loss) that removing sinks closes; 1 = no memorization left",
    "gap_closure_natural": "the same, on repeated natural documents only",
    "gap_closure_canary": "the same, on repeated random-token canaries only",
    "val_loss_ratio": "validation loss after sink removal / standard validation loss; the price of removal (1 = free)",
    "own_sinks_repeated_loss": "repeated-document loss with each document's own sinks on: the memorization is there, in the sinks",
    "own_sinks_to_standard_repeated_loss": "that loss / the standard model's repeated loss (about 1 or below: sinks hold what standard training memorizes)",
    "dedup_gap_closure": "gap closed by training on deduplicated data (each repeated document once) instead",
    "dedup_val_loss_ratio": "dedup's validation loss / standard's",
    "posthoc_best_gap_closure": "best gap closure of the post-hoc neuron-zeroing baseline over its sweep, at any val-loss cost",
    "posthoc_gap_closure_at_same_val_loss": "gap closure of the post-hoc baseline at no more val-loss cost than memsinks",
}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"
    return str(value)


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
        f"sink_active_prob {mc['sink_active_prob']}. Total time {report['timings_s'].get('total', 0):.0f} s.",
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
              f"{report['config']['eval']['suffix']} tokens exactly.", "", "| summary | value | meaning |", "|---|---|---|"]
    for key, value in s.items():
        lines.append(f"| {key} | {_fmt(value)} | {MEANINGS.get(key, '')} |")
    lines += ["", "Plots: `curves.png` (losses over training), `tradeoff.png` (gap closed against val loss).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curves = report["curves"]
    if curves:
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
        paths.append(out / "curves.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    m = report["metrics"]
    if "standard" in m:
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
        if "dedup" in m:
            ax.plot(*point(m["dedup"]), "^", color="tab:green", markersize=9, label="dedup")
        if "memsinks_removed" in m:
            ax.plot(*point(m["memsinks_removed"]), "*", color="tab:red", markersize=14, label="memsinks, sinks removed")
        paths.append(save_tradeoff(fig, ax, "Removing memorization: what it closes and what it costs",
                                   out / "tradeoff.png"))
    return paths


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
