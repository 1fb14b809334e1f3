"""``python -m benchmarks.memorization scale CONFIG``: gap closure and val-loss cost of memsinks against model size and
MLP shape, on one config's stream. Each point is a ``standard`` and a ``memsinks`` run of the
benchmark (``runner.run``) with ``model.layers`` / ``model.hidden`` / ``model.mlp`` set; each run
keeps its own directory, and ``scale.json``, ``scale.md`` and ``scale.png`` are rewritten after
every point, so a stopped study keeps what it measured."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

from .config import BenchmarkConfig
from .runner import run


def parse_models(text: str) -> list[tuple[int, int]]:
    """``"2x64,4x128"`` -> ``[(2, 64), (4, 128)]`` (layers x hidden), each checked before any
    point trains: the hidden size must split into ``heads_for(hidden)`` heads."""
    models = []
    for item in text.split(","):
        layers, _, hidden = item.strip().partition("x")
        if not (layers.isdigit() and hidden.isdigit()) or int(layers) < 1 or int(hidden) < 8:
            raise ValueError(f"--models: {item!r} is not LAYERSxHIDDEN (e.g. 4x128)")
        if int(hidden) % heads_for(int(hidden)):
            raise ValueError(f"--models: hidden size {hidden} does not split into {heads_for(int(hidden))} heads "
                             "(use a multiple of 32)")
        models.append((int(layers), int(hidden)))
    return models


def heads_for(hidden: int) -> int:
    """Attention heads of 32 dimensions, at least 2."""
    return max(2, hidden // 32)


def point_config(cfg: BenchmarkConfig, layers: int, hidden: int, ratio: int) -> BenchmarkConfig:
    """The config of one point: the model resized, heads of 32 dimensions (at least 2), the
    runs reduced to standard and memsinks."""
    model = dataclasses.replace(cfg.model, layers=layers, hidden=hidden, heads=heads_for(hidden), mlp=hidden * ratio)
    return dataclasses.replace(copy.deepcopy(cfg), model=model, runs=["standard", "memsinks"])


def scale(cfg: BenchmarkConfig, out_dir: str | os.PathLike, models: list[tuple[int, int]],
          ratios: list[int]) -> list[dict]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points: list[dict] = []
    for layers, hidden in models:
        for ratio in ratios:
            name = f"{layers}x{hidden}-mlp{ratio}x"
            report = run(point_config(cfg, layers, hidden, ratio), out / name)
            s, m = report["summary"], report["metrics"]
            points.append({"name": name, "layers": layers, "hidden": hidden, "mlp_ratio": ratio,
                           "parameters": report["model_parameters"], "gap_closure": s["gap_closure"],
                           "gap_closure_natural": s.get("gap_closure_natural"),
                           "gap_closure_canary": s.get("gap_closure_canary"), "val_loss_ratio": s["val_loss_ratio"],
                           "standard_gap": m["standard"]["memorization_gap"],
                           "removed_gap": m["memsinks_removed"]["memorization_gap"],
                           "standard_val_loss": m["standard"]["val_loss"],
                           "standard_extraction": s["standard_extraction_rate"],
                           "removed_extraction": s["memsinks_extraction_rate"],
                           "seconds": report["timings_s"]["total"]})
            if report["processes"]["rank"] == 0:
                _write(points, cfg, out)
    return points


def _write(points: list[dict], cfg: BenchmarkConfig, out: Path) -> None:
    (out / "scale.json").write_text(json.dumps({"points": points, "config": cfg.to_dict()}, indent=2, default=float))
    rows = ["| model | parameters | MLP | gap closed (natural / canary) | val-loss ratio | gap: standard -> removed "
            "| extraction: standard -> removed |", "|---|---|---|---|---|---|---|"]
    for p in points:
        rows.append(f"| {p['layers']} x {p['hidden']} | {p['parameters'] / 1e6:.2f}M | {p['mlp_ratio']}x "
                    f"| {p['gap_closure']:.3f} ({_fmt(p['gap_closure_natural'])} / {_fmt(p['gap_closure_canary'])}) "
                    f"| {p['val_loss_ratio']:.3f} | {p['standard_gap']:.2f} -> {p['removed_gap']:.2f} "
                    f"| {p['standard_extraction']:.2f} -> {p['removed_extraction']:.2f} |")
    (out / "scale.md").write_text("\n".join(rows) + "\n")
    _plot(points, out / "scale.png")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ratio in sorted({p["mlp_ratio"] for p in points}):
        row = sorted((p for p in points if p["mlp_ratio"] == ratio), key=lambda p: p["parameters"])
        x = [p["parameters"] / 1e6 for p in row]
        left.plot(x, [p["gap_closure"] for p in row], "o-", label=f"MLP {ratio}x hidden")
        right.plot(x, [p["val_loss_ratio"] for p in row], "o-", label=f"MLP {ratio}x hidden")
    left.axhline(0.5, color="grey", lw=0.8, ls="--")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    ticks = sorted({p["parameters"] / 1e6 for p in points})
    for ax, title in ((left, "gap closed by removing sinks"), (right, "val loss, sinks removed / standard")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xticks(ticks, [f"{t:.2f}" for t in ticks], fontsize=8)
        ax.set_xlabel("parameters (millions)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
