"""The benchmark's runs on several CPU cores: runs that share no model go to separate worker
processes (``workers: N`` in the config), each a ``Benchmark`` of its own with ``threads`` threads.

Every worker builds the same setting and initial model from the seed, so a run trains exactly
as it would in one process: the split changes the wall clock, not the figures. Post-hoc zeroing
and forgetting read the standard model (forgetting the memsinks model too), so they stay in the
process that trains it. Workers report progress and their results through one queue; the parent
draws the progress and writes the report.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queues
import traceback
from typing import Callable

from .config import BenchmarkConfig

# What a run costs, in trainings (post-hoc trains nothing; forgetting trains up to two models and
# runs the unlearning baselines), and which runs read another's model.
COST = {"standard": 1.0, "memsinks": 1.0, "dedup": 1.0, "goldfish": 1.0, "memsinks+goldfish": 1.0,
        "posthoc": 0.2, "forget": 3.0}
NEEDS = {"posthoc": ("standard",), "forget": ("standard", "memsinks")}


def groups(runs: list[str], workers: int) -> list[list[str]]:
    """``runs`` split into at most ``workers`` groups: runs that read each other's models stay
    together, and the groups are balanced by ``COST`` (longest first, each to the lightest group).
    Each group keeps the order of ``runs``."""
    together: dict[str, set[str]] = {name: {name} for name in runs}
    for name in runs:
        for other in NEEDS.get(name, ()):
            if other in runs and together[name] is not together[other]:
                joined = together[name] | together[other]
                for member in joined:
                    together[member] = joined
    parts = {id(s): s for s in together.values()}.values()
    bins: list[list[str]] = [[] for _ in range(max(1, min(workers, len(runs))))]
    load = [0.0] * len(bins)
    for part in sorted(parts, key=lambda p: (-sum(COST[n] for n in p), runs.index(min(p, key=runs.index)))):
        i = load.index(min(load))
        bins[i] += part
        load[i] += sum(COST[n] for n in part)
    return [sorted(b, key=runs.index) for b in bins if b]


def trainings(cfg: BenchmarkConfig, runs: list[str]) -> int:
    """How many models ``runs`` train (post-hoc trains none; forgetting its own regime, unless it is
    the main one and memsinks runs, and the retrained model)."""
    n = sum(name in runs for name in ("standard", "memsinks", "dedup", "goldfish", "memsinks+goldfish"))
    if "forget" in runs:
        n += int(cfg.forget_memsink_config() != cfg.memsink_config() or "memsinks" not in runs)
        n += int(cfg.forget.retrain)
    return n


def run_in_workers(cfg: BenchmarkConfig, out_dir, parts: list[list[str]], target: Callable) -> list[dict]:
    """``target(cfg, out_dir, progress)`` (a module-level function: it is pickled) for each group of
    ``parts`` in its own process, ``cfg.runs`` set to the group; returns what each returned, in the
    order of ``parts``. Draws one progress display for all of them; a worker's error is raised here."""
    import dataclasses

    from .progress import Progress

    ctx = multiprocessing.get_context("spawn")  # (no fork of a process that has torch threads running)
    events = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(target, dataclasses.replace(cfg, runs=part, workers=1), out_dir, i,
                                               events), daemon=True) for i, part in enumerate(parts)]
    total = sum(trainings(cfg, part) for part in parts)
    progress = Progress(total, total * cfg.train.steps, desc=f"{cfg.name or 'benchmark'} ({len(parts)} processes)")
    states: dict[int, dict] = {}
    for p in procs:
        p.start()
    try:
        while len(states) < len(procs):
            try:
                kind, payload = events.get(timeout=5.0)
            except queues.Empty:
                dead = [p for i, p in enumerate(procs) if i not in states and not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a benchmark worker exited with code {dead[0].exitcode} before it "
                                       "reported its results") from None
                continue
            if kind == "progress":
                progress.handle(payload)
            elif kind == "error":
                raise RuntimeError(f"a benchmark worker failed (runs {parts[payload[0]]}):\n{payload[1]}")
            else:
                states[payload[0]] = payload[1]
    finally:
        progress.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        events.close()
        events.join_thread()
    return [states[i] for i in range(len(procs))]


def _worker(target: Callable, cfg: BenchmarkConfig, out_dir, index: int, events) -> None:
    from .progress import QueueProgress

    os.environ.setdefault("TQDM_DISABLE", "1")  # (the parent draws; nothing of a worker's own)
    try:
        events.put(("state", (index, target(cfg, out_dir, QueueProgress(events)))))
    except BaseException:  # noqa: BLE001 (sent to the parent, which raises it)
        events.put(("error", (index, traceback.format_exc())))
