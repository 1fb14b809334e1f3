"""``python -m benchmarks.memorization sweep``: memsinks over sink_fraction x sink_active_prob against one standard run
on the same stream, plotted as gap closure against val-loss cost."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from hf_memsinks.config import MemSinkConfig
from hf_memsinks.model.add_sinks import get_memsink_model

from .config import BenchmarkConfig
from .metrics import measure
from .report import save_tradeoff
from .setting import build_setting
from .training import build_model, make_accelerator, train


def sweep(cfg: BenchmarkConfig, out_dir: str | os.PathLike, fractions: list[float], probs: list[float]) -> dict:
    out = Path(out_dir)
    accelerator = make_accelerator(cfg)
    setting = build_setting(cfg)
    base = build_model(cfg, len(setting.tokenizer), setting.max_length).to(accelerator.device)
    standard = copy.deepcopy(base)
    train(standard, setting, setting.stream, cfg, with_ids=False, label="standard", accelerator=accelerator)
    std = measure(standard, setting, cfg)
    points = []
    for fraction in fractions:
        for prob in probs:
            settings = {**cfg.memsinks, "sink_fraction": fraction, "sink_active_prob": prob}
            model = get_memsink_model(copy.deepcopy(base), MemSinkConfig(**settings))
            train(model, setting, setting.stream, cfg, with_ids=True, label=f"memsinks {fraction}/{prob}",
                  accelerator=accelerator)
            removed = measure(copy.deepcopy(model).remove_sinks(), setting, cfg)
            points.append({"sink_fraction": fraction, "sink_active_prob": prob,
                           "gap_closure": 1 - removed["memorization_gap"] / std["memorization_gap"],
                           "val_loss_ratio": removed["val_loss"] / std["val_loss"], **removed})
    result = {"standard": std, "points": points, "config": cfg.to_dict()}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(result, indent=2, default=float))
        _plot(points, out / "sweep.png")
    return result


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for prob in sorted({p["sink_active_prob"] for p in points}):
        row = sorted((p for p in points if p["sink_active_prob"] == prob), key=lambda p: p["sink_fraction"])
        ax.plot([p["val_loss_ratio"] for p in row], [p["gap_closure"] for p in row], "o-",
                label=f"sink_active_prob {prob}")
        for p in row:
            ax.annotate(f"{p['sink_fraction']}", (p["val_loss_ratio"], p["gap_closure"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    save_tradeoff(fig, ax, "MemSinks trade-off (labels: sink_fraction)", path)
