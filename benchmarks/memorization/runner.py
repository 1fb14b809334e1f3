"""``python -m benchmarks.memorization run CONFIG.yaml``: train standard / memsinks / dedup / goldfish /
memsinks+goldfish on one fixed document stream, apply the post-hoc baseline, measure
memorization, run the forgetting experiment, and write report.json, report.md and plots into
the run directory.

``run`` reads as its steps: each configured run is one method of ``Benchmark``, which holds what
the steps share (the setting, the initial model, the accelerator) and what they produce (models,
metrics, curves, each process's share of the training, timings). With ``workers: N`` the runs
that share no model are split over N worker processes (workers.py), each a
``Benchmark`` of its own; the same seed gives the same figures either way.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_memsinks.config import MemSinkConfig
from hf_memsinks.model.add_sinks import get_memsink_model
from hf_memsinks.version import __version__

from . import forgetting
from .config import BenchmarkConfig, GoldfishConfig
from .metrics import measure, summarize
from .posthoc import neuron_specificity, zero_top_neurons
from .progress import Progress
from .setting import build_setting
from .training import build_model, make_accelerator, precision, train
from .workers import groups, run_in_workers, trainings


def run(cfg: BenchmarkConfig, out_dir: str | os.PathLike) -> dict:
    """Every configured run on one stream, then report.json, report.md and plots in ``out_dir``.
    Under ``accelerate launch`` each training is data-parallel; every process evaluates the same
    (identical) models and only the main process writes."""
    start = time.time()
    runs = needed_runs(cfg)
    parts = groups(runs, cfg.workers)
    if len(parts) > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        states = run_in_workers(cfg, out_dir, parts, run_part)
        report = assemble(cfg, states, time.time() - start, workers=parts)
        write_report(report, Path(out_dir))
        return report
    progress = Progress(trainings(cfg, runs), trainings(cfg, runs) * cfg.train.steps,
                        enabled=_is_main_process(), desc=cfg.name or "benchmark")
    bench = Benchmark(cfg, out_dir, progress)
    run_steps(bench, runs)
    progress.close()
    report = assemble(cfg, [bench.state()], time.time() - start)
    if bench.accelerator.is_main_process:
        write_report(report, Path(out_dir))
    bench.accelerator.wait_for_everyone()
    return report


def needed_runs(cfg: BenchmarkConfig) -> list[str]:
    """The configured runs in the order they run, with ``standard`` where post-hoc or forgetting needs it."""
    runs = set(cfg.runs) | ({"standard"} if {"posthoc", "forget"} & set(cfg.runs) else set())
    return [name for name in ORDER if name in runs]


ORDER = ("standard", "memsinks", "dedup", "goldfish", "memsinks+goldfish", "posthoc", "forget")


def run_steps(bench: Benchmark, runs: list[str]) -> None:
    steps = {"standard": bench.standard, "memsinks": bench.memsinks, "dedup": bench.dedup,
             "goldfish": bench.goldfish, "memsinks+goldfish": bench.memsinks_goldfish,
             "posthoc": bench.posthoc, "forget": bench.forget}
    for name in ORDER:
        if name in runs:
            steps[name]()


def run_part(cfg: BenchmarkConfig, out_dir, progress) -> dict:
    """A worker process's part of ``run`` (its runs are ``cfg.runs``): what it produced."""
    bench = Benchmark(cfg, out_dir, progress)
    run_steps(bench, needed_runs(cfg))
    return bench.state()


def _is_main_process() -> bool:
    """From the launcher's environment: building accelerate's state here, before the benchmark's
    Accelerator, would leave every process believing it is the main one."""
    return int(os.environ.get("RANK", "0")) == 0


def write_report(report: dict, out: Path) -> None:
    from .report import write_markdown, write_plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    write_plots(report, out)
    write_markdown(report, out)


class Benchmark:
    """The shared state of one ``run`` and its steps."""

    def __init__(self, cfg: BenchmarkConfig, out_dir: str | os.PathLike, progress=None):
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        self.accelerator = make_accelerator(cfg)
        self.start = time.time()
        self.timings: dict[str, float] = {}
        self.setting = build_setting(cfg)
        self.timings["data"] = time.time() - self.start
        self.base = build_model(cfg, len(self.setting.tokenizer), self.setting.max_length).to(self.accelerator.device)
        self.memsink_config = cfg.memsink_config()
        self.metrics: dict[str, Any] = {}
        self.curves: dict[str, list] = {}
        self.shares: dict[str, dict] = {}
        self.models: dict[str, Any] = {}
        self.forgetting: dict | None = None

    # -- training -------------------------------------------------------------------------------

    def train(self, name: str, model, stream, with_ids: bool, goldfish: GoldfishConfig | None = None):
        t0 = time.time()
        self.curves[name], self.shares[name] = train(model, self.setting, stream, self.cfg, with_ids=with_ids,
                                                     label=name, goldfish=goldfish, accelerator=self.accelerator,
                                                     progress=self.progress)
        self.timings[name] = time.time() - t0
        return model

    def train_memsinks(self, name: str, key: str, config: MemSinkConfig, goldfish: GoldfishConfig | None = None):
        """Train a patched copy of the initial model, then measure it with each document's own
        sinks on (``{key}_own_sinks``) and with the sinks removed (``{key}_removed``)."""
        model = self.train(name, get_memsink_model(copy.deepcopy(self.base), config), self.setting.stream, True,
                           goldfish)
        with model.sink_mode("activate"):
            self.metrics[f"{key}_own_sinks"] = measure(model, self.setting, self.cfg, own_ids=True)
        t0 = time.time()
        removed = copy.deepcopy(model).remove_sinks()
        self.timings[f"{key}_remove_sinks"] = time.time() - t0
        self.metrics[f"{key}_removed"] = measure(removed, self.setting, self.cfg)
        if key == "memsinks" and self.cfg.save_models and self.accelerator.is_main_process:
            removed.save_pretrained(self.out / "memsinks_removed")  # (atomic: hf_memsinks.checkpoints.atomic)
            self.setting.tokenizer.save_pretrained(self.out / "memsinks_removed")
        return model

    def train_plain(self, name: str, stream, goldfish: GoldfishConfig | None = None) -> None:
        self.models[name] = self.train(name, copy.deepcopy(self.base), stream, False, goldfish)
        self.metrics[name] = measure(self.models[name], self.setting, self.cfg)

    # -- the steps --------------------------------------------------------------------------------

    def standard(self) -> None:
        self.train_plain("standard", self.setting.stream)

    def memsinks(self) -> None:
        self.models["memsinks"] = self.train_memsinks("memsinks", "memsinks", self.memsink_config)

    def dedup(self) -> None:
        self.train_plain("dedup", self.setting.dedup_stream)

    def goldfish(self) -> None:
        self.train_plain("goldfish", self.setting.stream, self.cfg.goldfish)

    def memsinks_goldfish(self) -> None:
        self.train_memsinks("memsinks+goldfish", "memsinks_goldfish", self.memsink_config, self.cfg.goldfish)

    def posthoc(self) -> None:
        """Zero the standard model's neurons most specific to the repeated documents, swept over
        the share removed."""
        t0 = time.time()
        standard, setting = self.models["standard"], self.setting
        scores = neuron_specificity(standard, setting.repeated, setting.general_sample, setting.pad_id)
        sweep = []
        for fraction in tqdm(self.cfg.posthoc.fractions, desc="posthoc sweep",
                             disable=not self.accelerator.is_main_process):
            pruned = zero_top_neurons(standard, scores, fraction)
            sweep.append({"fraction_removed": fraction, **measure(pruned, setting, self.cfg)})
        self.metrics["posthoc_sweep"] = sweep
        self.timings["posthoc"] = time.time() - t0

    def forget(self) -> None:
        """The forgetting experiment (forgetting.py): forget F of each of ``forget.sizes``
        repeated documents in each memsinks regime, against random IDs, retraining and post-hoc zeroing."""
        f, setting, seed = self.cfg.forget, self.setting, self.cfg.seed
        order = forgetting.forget_order(setting, seed)
        sizes = sorted(f.sizes)
        sets = {n: order[:n] for n in sizes}
        keep = order[max(sizes):]
        targeted = self.cfg.forget_memsink_config()
        regimes = {}
        label = lambda c: f"sinks {c.sink_fraction} p={c.sink_active_prob}"  # noqa: E731
        if "memsinks" in self.models:
            regimes[label(self.memsink_config)] = self.models["memsinks"]
        if targeted != self.memsink_config or "memsinks" not in self.models:
            regimes[label(targeted)] = self.train_memsinks("memsinks (forget regime)", "forget_memsinks", targeted)
        retrained = None
        if f.retrain:
            retrained = self.train("retrained without F", copy.deepcopy(self.base),
                                   setting.stream_without(sets[max(sizes)]), False)
        t0 = time.time()
        rows = []
        for regime, model in regimes.items():
            rows += forgetting.evaluate_memsinks(model, setting, self.cfg, sets, keep, regime, seed)
        rows += forgetting.evaluate_standard(self.models["standard"], retrained, setting, self.cfg, sets, keep,
                                             f.posthoc_fractions)
        rows = forgetting.add_privleak(rows)
        self.timings["forget_eval"] = time.time() - t0
        self.forgetting = {"sizes": sizes, "keep": len(keep),
                           "val_docs": min(f.val_docs or len(setting.validation), len(setting.validation)),
                           "regimes": {k: m.memsink_config.to_dict() for k, m in regimes.items()},
                           "summary": forgetting.summarize(rows),
                           "unlearning": forgetting.summarize_baselines(rows), "rows": rows}

    # -- what a run produced --------------------------------------------------------------------------

    def state(self) -> dict:
        """What this process produced, as plain data (what a worker process sends back)."""
        a = self.accelerator
        return {"metrics": self.metrics, "curves": self.curves, "shares": self.shares, "timings": self.timings,
                "forgetting": self.forgetting, "setting": self.setting.describe(),
                "model_parameters": sum(p.numel() for p in self.base.parameters()),
                "processes": {"count": a.num_processes, "rank": a.process_index,
                              "precision": precision(self.cfg, a.device), "device": a.device.type},
                "versions": versions()}


def assemble(cfg: BenchmarkConfig, states: list[dict], elapsed: float, workers: list[list[str]] | None = None) -> dict:
    """The report of one benchmark from the states of the processes that ran its parts."""
    merged = {key: {} for key in ("metrics", "curves", "shares", "timings")}
    for state in states:
        for key in merged:
            merged[key].update(state[key])
    first = states[0]
    metrics, timings = merged["metrics"], merged["timings"]
    timings["total"] = elapsed
    report = {
        "summary": summarize(metrics) if "standard" in metrics else {},
        "metrics": {k: v for k, v in metrics.items() if k != "posthoc_sweep"},
        "posthoc_sweep": metrics.get("posthoc_sweep", []),
        "forgetting": next((s["forgetting"] for s in states if s["forgetting"]), None),
        "curves": merged["curves"],
        "setting": first["setting"],
        "config": cfg.to_dict(),
        "memsink_config": cfg.memsink_config().to_dict(),
        "model_parameters": first["model_parameters"],
        "processes": {**first["processes"], "shares": merged["shares"]},
        "versions": first["versions"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    if workers:
        report["workers"] = workers
    return report


def versions() -> dict:
    import transformers

    return {"hf_memsinks": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
