"""report.md of the fine-tuning benchmark: one row per run, means over seeds."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (("gap_closure", "gap closed", "{:.2f}"), ("gap_closure_natural", "natural", "{:.2f}"),
           ("gap_closure_canary", "canary", "{:.2f}"), ("val_loss_ratio", "new-domain val ratio", "{:.3f}"),
           ("retention_loss_ratio", "old-domain val ratio", "{:.3f}"), ("extraction_rate", "extraction", "{:.2f}"),
           ("val_loss", "new val", "{:.3f}"), ("old_val_loss", "old val", "{:.3f}"),
           ("trainable_params", "trainable params", "{:,.0f}"), ("extra_params", "extra params", "{:,.0f}"),
           ("step_time_ratio", "step time", "{:.2f}"))


def table(report: dict) -> str:
    lines = ["| run | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in report["runs"].items():
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(report: dict, out: Path) -> None:
    seeds = [s["seed"] for s in report["seeds"]]
    ref = report["config"]["finetune"]["reference"]
    text = [f"# Fine-tuning benchmark ({report['config'].get('name')}), seeds {seeds}", "",
            f"Means over seeds; ratios and gap closed against `{ref}`; memsinks runs with sinks removed.", "",
            table(report), ""]
    if report["summary"]:
        text += ["Summary (the recipe):", "", "```", *(f"{k}: {v}" for k, v in report["summary"].items()), "```", ""]
    (out / "report.md").write_text("\n".join(text))
