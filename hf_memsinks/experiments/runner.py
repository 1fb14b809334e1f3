"""``hf-memsinks run CONFIG.yaml``: train standard / memsinks / dedup / goldfish /
memsinks+goldfish on one fixed document stream, apply the post-hoc baseline, measure
memorization, run the forgetting experiment, and write report.json, report.md and plots into
the run directory."""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .. import __version__
from ..config import MemSinkConfig
from ..data import ids_for_documents
from ..evaluation import document_losses, extraction_hits
from ..model import get_memsink_model
from . import forgetting
from .posthoc import neuron_specificity, zero_top_neurons
from .setting import Setting, build_setting
from .training import PRECISIONS, make_accelerator, train

RUNS = ("standard", "memsinks", "dedup", "posthoc", "goldfish", "memsinks+goldfish", "forget")
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "threads": None,
    "device": "auto",  # "auto": cuda when available, else cpu
    "corpus": {"source": "embedded", "text_field": "text"},
    "tokenizer": {"vocab_size": 1024},
    "model": {"type": "gpt2", "layers": 4, "hidden": 128, "heads": 4, "mlp": 512},
    "train": {"lr": 1e-3, "warmup": 50, "weight_decay": 0.1, "eval_every": 100, "curve_docs": 64},
    "eval": {"prefix": 16, "suffix": 16, "batch_size": 64},
    "memsinks": {},
    "posthoc": {"fractions": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3]},
    # Goldfish loss (hf_memsinks.goldfish): drop 1 target in k, by a hash of the h tokens ending at it
    "goldfish": {"k": 4, "h": 13, "hash": "table", "seed": 0},
    # Forget the first n repeated documents for each n in sizes; "memsinks" (over the main memsinks
    # section) is the regime trained for it: a small sink_active_prob keeps documents' sinks apart
    "forget": {"sizes": [1, 4, 16], "memsinks": {"sink_fraction": 0.5, "sink_active_prob": 0.05},
               "posthoc_fractions": [0.05, 0.2], "retrain": True, "val_docs": 128},
    "runs": list(RUNS),
}


# Every key a config may have, with its type: a misspelled key is an error naming the nearest valid
# one (not a setting silently ignored), a value of the wrong type an error naming the key.
_INT, _FLOAT, _STR = "int", "float", "str"
SCHEMA: dict[str, Any] = {
    "name": _STR, "seed": _INT, "threads": (_INT, None), "device": _STR, "save_models": bool,
    "corpus": {"source": _STR, "text_field": _STR, "split": _STR},
    "tokenizer": {"vocab_size": _INT, "path": (_STR, None)},
    "data": {k: _INT for k in ("max_length", "repeated_natural", "repeated_canaries", "repetitions", "control",
                                "validation", "canary_length")},
    "model": {"type": _STR, "layers": _INT, "hidden": _INT, "heads": _INT, "mlp": _INT},
    "train": {"steps": _INT, "batch_size": _INT, "lr": _FLOAT, "min_lr_ratio": _FLOAT, "warmup": _INT,
              "weight_decay": _FLOAT, "eval_every": _INT, "curve_docs": _INT, "precision": _STR},
    "eval": {"prefix": _INT, "suffix": _INT, "batch_size": _INT},
    "memsinks": "memsinks",  # MemSinkConfig's fields, checked by MemSinkConfig
    "posthoc": {"fractions": list},
    "goldfish": {"k": _INT, "h": _INT, "hash": _STR, "seed": _INT},
    "forget": {"sizes": list, "memsinks": (dict, None), "posthoc_fractions": list, "retrain": bool,
               "val_docs": (_INT, None)},
    "runs": list,
}


def _nearest(key: str, valid, section: str = "") -> str:
    import difflib

    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{section}{near[0]}'?)" if near else f" (valid: {', '.join(sorted(valid))})"


def _type_ok(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is None and value is None:
            return True
        if k == _INT and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k == _FLOAT and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k == _STR and isinstance(value, str):
            return True
        if k in (bool, list, dict) and isinstance(value, k):
            return True
    return False


def _check_memsinks_section(value: Any, name: str, where: str) -> None:
    import dataclasses

    if not isinstance(value, dict):
        raise ValueError(f"{where}: {name!r} must be a mapping of MemSinkConfig fields, got {value!r}")
    fields = {f.name for f in dataclasses.fields(MemSinkConfig)} - {"sink_layout"}
    for k in value:
        if k not in fields:
            raise ValueError(f"{where}: unknown key '{name}.{k}'{_nearest(k, fields, name + '.')}")


def check_config(cfg: dict, where: str = "config") -> None:
    """Every key known, every value of its type (see :data:`SCHEMA`)."""
    for key, value in cfg.items():
        if key not in SCHEMA:
            raise ValueError(f"{where}: unknown key {key!r}{_nearest(key, SCHEMA)}")
        kind = SCHEMA[key]
        if kind == "memsinks":
            _check_memsinks_section(value, "memsinks", where)
        elif isinstance(kind, dict):
            if key == "forget" and isinstance(value, dict) and value.get("memsinks") is not None:
                _check_memsinks_section(value["memsinks"], "forget.memsinks", where)
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key!r} must be a section (a mapping), got {value!r}")
            for k, v in value.items():
                if k not in kind:
                    raise ValueError(f"{where}: unknown key '{key}.{k}'{_nearest(k, kind, key + '.')}")
                if not _type_ok(v, kind[k]):
                    want = " or ".join("null" if t is None else getattr(t, "__name__", t)
                                       for t in (kind[k] if isinstance(kind[k], tuple) else (kind[k],)))
                    raise ValueError(f"{where}: '{key}.{k}' must be {want}, got {v!r}")
                if kind[k] == _INT and v < (0 if k in ("warmup", "control", "repeated_natural", "repeated_canaries",
                                                       "seed") else 1):
                    raise ValueError(f"{where}: '{key}.{k}' must be a positive integer, got {v!r}")
        elif not _type_ok(value, kind):
            want = getattr(kind, "__name__", kind)
            raise ValueError(f"{where}: {key!r} must be {want}, got {value!r}")


# ---- config ---------------------------------------------------------------------------------------


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """YAML config merged over the defaults; ``overrides`` are ``dotted.key=value`` (YAML values)."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of config sections, got {type(loaded).__name__}")
    check_config(loaded, str(path))
    cfg = _merge(DEFAULTS, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.steps=200)")
        key, raw = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: not a valid YAML value ({' '.join(str(err).split())})") from None
        check_config(cfg, f"override {item!r}")
    for section in ("data", "train"):
        if section not in cfg:
            raise ValueError(f"config {path} has no {section!r} section")
    for key in ("steps", "batch_size"):
        if key not in cfg["train"]:
            raise ValueError(f"config {path}: train.{key} is required")
    unknown = set(cfg["runs"]) - set(RUNS)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}; choose from {RUNS}")
    if cfg["train"].get("precision", "auto") not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {cfg['train']['precision']!r}")
    MemSinkConfig(**cfg["memsinks"])  # fail early on a bad MemSink setting
    MemSinkConfig(**_forget_memsinks(cfg))
    from ..goldfish import _check

    _check(int(cfg["goldfish"]["k"]), int(cfg["goldfish"]["h"]), cfg["goldfish"].get("hash", "table"))
    repeated = int(cfg["data"].get("repeated_natural", 0)) + int(cfg["data"].get("repeated_canaries", 0))
    sizes = [int(n) for n in cfg["forget"]["sizes"]]
    if "forget" in cfg["runs"] and (not sizes or min(sizes) < 1 or max(sizes) >= repeated):
        raise ValueError(f"forget.sizes {sizes}: each must be 1 .. {repeated - 1} (some repeated documents must be kept)")
    return cfg


def _forget_memsinks(cfg: dict) -> dict:
    return {**cfg["memsinks"], **(cfg["forget"].get("memsinks") or {})}


# ---- model and training ------------------------------------------------------------------------------


def build_model(cfg: dict, vocab_size: int, max_length: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg["model"]
    kind = m["type"]
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=m["hidden"], n_layer=m["layers"], n_head=m["heads"],
                                      n_inner=m["mlp"], n_positions=max_length, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, **common)
    elif kind in ("llama", "gpt_neox"):
        config = AutoConfig.for_model(kind, hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                                      num_attention_heads=m["heads"], intermediate_size=m["mlp"],
                                      max_position_embeddings=max_length, **common)
        if kind == "llama":
            config.num_key_value_heads = m["heads"]
            config.tie_word_embeddings = True
        else:
            config.hidden_dropout = config.attention_dropout = 0.0
    else:
        raise ValueError(f"model.type must be gpt2, llama or gpt_neox, got {kind!r}")
    torch.manual_seed(int(cfg["seed"]))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# ---- metrics ------------------------------------------------------------------------------------------


def measure(model, setting: Setting, cfg: dict, own_ids: bool = False) -> dict:
    """The point-4 metrics. ``own_ids``: each document runs with its own ID (own sinks on)."""
    e, pad = cfg["eval"], setting.pad_id

    def ids(docs):
        return ids_for_documents(docs) if own_ids else None

    def losses(docs):
        return document_losses(model, docs, ids(docs), batch_size=int(e["batch_size"]), pad_id=pad)

    def extraction(docs):
        hits = extraction_hits(model, docs, int(e["prefix"]), int(e["suffix"]), ids(docs), int(e["batch_size"]))
        return hits.float().mean().item() if hits.numel() else float("nan")

    out: dict[str, float] = {"val_loss": losses(setting.validation).mean().item()}
    parts = {"natural": (setting.natural, setting.control_natural), "canary": (setting.canaries, setting.control_canaries)}
    rep_all, ctl_all = [], []
    for kind, (rep_docs, ctl_docs) in parts.items():
        if not rep_docs:
            continue
        rep, ctl = losses(rep_docs), losses(ctl_docs)
        rep_all.append(rep)
        ctl_all.append(ctl)
        out[f"repeated_loss_{kind}"] = rep.mean().item()
        out[f"control_loss_{kind}"] = ctl.mean().item()
        out[f"memorization_gap_{kind}"] = out[f"control_loss_{kind}"] - out[f"repeated_loss_{kind}"]
        out[f"extraction_rate_{kind}"] = extraction(rep_docs)
        out[f"control_extraction_rate_{kind}"] = extraction(ctl_docs)
    out["repeated_loss"] = torch.cat(rep_all).mean().item()
    out["control_loss"] = torch.cat(ctl_all).mean().item()
    out["memorization_gap"] = out["control_loss"] - out["repeated_loss"]
    n = {k: len(v[0]) for k, v in parts.items()}
    out["extraction_rate"] = sum(out.get(f"extraction_rate_{k}", 0.0) * n[k] for k in n if n[k]) / max(1, sum(n.values()))
    return out


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through ``points`` (sorted by x); None outside it."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def summarize(metrics: dict) -> dict:
    std = metrics["standard"]
    out: dict[str, Any] = {}

    def closure(run: dict, suffix: str = "") -> float:
        return 1.0 - run[f"memorization_gap{suffix}"] / std[f"memorization_gap{suffix}"]

    if "memsinks_removed" in metrics:
        ms = metrics["memsinks_removed"]
        out["gap_closure"] = closure(ms)
        for kind in ("natural", "canary"):
            if f"memorization_gap_{kind}" in ms:
                out[f"gap_closure_{kind}"] = closure(ms, f"_{kind}")
        out["val_loss_ratio"] = ms["val_loss"] / std["val_loss"]
        own = metrics["memsinks_own_sinks"]
        out["own_sinks_repeated_loss"] = own["repeated_loss"]
        out["own_sinks_to_standard_repeated_loss"] = own["repeated_loss"] / std["repeated_loss"]
    for key, name in (("goldfish", "goldfish"), ("memsinks_goldfish_removed", "memsinks_goldfish"),
                      ("forget_memsinks_removed", "forget_regime")):
        if key in metrics:
            out[f"{name}_gap_closure"] = closure(metrics[key])
            for kind in ("natural", "canary"):
                if f"memorization_gap_{kind}" in metrics[key]:
                    out[f"{name}_gap_closure_{kind}"] = closure(metrics[key], f"_{kind}")
            out[f"{name}_val_loss_ratio"] = metrics[key]["val_loss"] / std["val_loss"]
            out[f"{name}_extraction_rate"] = metrics[key]["extraction_rate"]
    if "memsinks_removed" in metrics:
        out["memsinks_extraction_rate"] = metrics["memsinks_removed"]["extraction_rate"]
    out["standard_extraction_rate"] = std["extraction_rate"]
    if "dedup" in metrics:
        out["dedup_gap_closure"] = closure(metrics["dedup"])
        out["dedup_val_loss_ratio"] = metrics["dedup"]["val_loss"] / std["val_loss"]
    sweep = metrics.get("posthoc_sweep")
    if sweep:
        points = [(1.0, 0.0)] + [(p["val_loss"] / std["val_loss"], closure(p)) for p in sweep]
        out["posthoc_best_gap_closure"] = max(closure(p) for p in sweep)
        if "val_loss_ratio" in out:
            # best closure the baseline reaches at no more val-loss cost than memsinks
            ok = [c for r, c in points if r <= out["val_loss_ratio"]]
            at = _interpolate(points, out["val_loss_ratio"])
            # (memsinks at or below the standard val loss: removing nothing, closure 0, is all it may do)
            out["posthoc_gap_closure_at_same_val_loss"] = max(ok + ([at] if at is not None else []), default=0.0)
    return out


# ---- the whole run -----------------------------------------------------------------------------------


def run(cfg: dict, out_dir: str | os.PathLike) -> dict:
    """Every configured run on one stream, then report.json, report.md and plots in ``out_dir``.
    Under ``accelerate launch`` each training is data-parallel; every process evaluates the same
    (identical) models and only the main process writes."""
    out = Path(out_dir)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.time()
    setting = build_setting(cfg)
    timings["data"] = time.time() - start
    vocab = len(setting.tokenizer)
    base = build_model(cfg, vocab, setting.max_length).to(accelerator.device)
    memsink_cfg = MemSinkConfig(**cfg["memsinks"])
    runs = set(cfg["runs"])
    if "posthoc" in runs or "forget" in runs:
        runs.add("standard")
    metrics: dict[str, Any] = {}
    curves: dict[str, list] = {}
    shares: dict[str, dict] = {}
    models: dict[str, Any] = {}

    def train_run(name: str, model, stream, with_ids: bool, goldfish: dict | None = None):
        t0 = time.time()
        curves[name], shares[name] = train(model, setting, stream, cfg, with_ids=with_ids, label=name,
                                           goldfish=goldfish, accelerator=accelerator)
        timings[name] = time.time() - t0
        return model

    def memsinks_run(name: str, key: str, config: MemSinkConfig, goldfish: dict | None = None):
        """Train, then measure with each document's own sinks on and with the sinks removed."""
        model = train_run(name, get_memsink_model(copy.deepcopy(base), config), setting.stream, True, goldfish)
        with model.sink_mode("activate"):
            metrics[f"{key}_own_sinks"] = measure(model, setting, cfg, own_ids=True)
        t0 = time.time()
        plain = copy.deepcopy(model).remove_sinks()
        timings[f"{key}_remove_sinks"] = time.time() - t0
        metrics[f"{key}_removed"] = measure(plain, setting, cfg)
        return model, plain

    if "standard" in runs:
        models["standard"] = train_run("standard", copy.deepcopy(base), setting.stream, False)
        metrics["standard"] = measure(models["standard"], setting, cfg)
    if "memsinks" in runs:
        models["memsinks"], plain = memsinks_run("memsinks", "memsinks", memsink_cfg)
        if cfg.get("save_models", False) and accelerator.is_main_process:
            plain.save_pretrained(out / "memsinks_removed")
            setting.tokenizer.save_pretrained(out / "memsinks_removed")
    if "dedup" in runs:
        models["dedup"] = train_run("dedup", copy.deepcopy(base), setting.dedup_stream, False)
        metrics["dedup"] = measure(models["dedup"], setting, cfg)
    if "goldfish" in runs:
        models["goldfish"] = train_run("goldfish", copy.deepcopy(base), setting.stream, False, cfg["goldfish"])
        metrics["goldfish"] = measure(models["goldfish"], setting, cfg)
    if "memsinks+goldfish" in runs:
        memsinks_run("memsinks+goldfish", "memsinks_goldfish", memsink_cfg, cfg["goldfish"])
    if "posthoc" in runs:
        t0 = time.time()
        scores = neuron_specificity(models["standard"], setting.repeated, setting.general_sample, setting.pad_id)
        sweep = []
        for fraction in tqdm(cfg["posthoc"]["fractions"], desc="posthoc sweep",
                             disable=not accelerator.is_main_process):
            pruned = zero_top_neurons(models["standard"], scores, float(fraction))
            sweep.append({"fraction_removed": float(fraction), **measure(pruned, setting, cfg)})
        metrics["posthoc_sweep"] = sweep
        timings["posthoc"] = time.time() - t0
    forget_report = None
    if "forget" in runs:
        forget_report = _forget(cfg, setting, base, models, metrics, memsink_cfg, train_run, memsinks_run, timings)
    timings["total"] = time.time() - start

    report = {
        "summary": summarize(metrics) if "standard" in metrics else {},
        "metrics": {k: v for k, v in metrics.items() if k != "posthoc_sweep"},
        "posthoc_sweep": metrics.get("posthoc_sweep", []),
        "forgetting": forget_report,
        "curves": curves,
        "setting": setting.describe(),
        "config": cfg,
        "memsink_config": memsink_cfg.to_dict(),
        "model_parameters": sum(p.numel() for p in base.parameters()),
        "processes": {"count": accelerator.num_processes, "rank": accelerator.process_index,
                      "precision": accelerator.mixed_precision,
                      "device": accelerator.device.type, "shares": shares},
        "versions": _versions(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    if accelerator.is_main_process:
        (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
        from .report import write_markdown, write_plots

        write_plots(report, out)
        write_markdown(report, out)
    accelerator.wait_for_everyone()
    return report


def _forget(cfg, setting, base, models, metrics, memsink_cfg, train_run, memsinks_run, timings) -> dict:
    """The forgetting experiment (experiments/forgetting.py): rows, summary, the sets' sizes."""
    f = cfg["forget"]
    seed = int(cfg.get("seed", 0))
    order = forgetting.forget_order(setting, seed)
    sizes = sorted(int(n) for n in f["sizes"])
    sets = {n: order[:n] for n in sizes}
    keep = order[max(sizes):]
    targeted_cfg = MemSinkConfig(**_forget_memsinks(cfg))
    regimes = {}
    label = lambda c: f"sinks {c.sink_fraction} p={c.sink_active_prob}"  # noqa: E731
    if "memsinks" in models:
        regimes[label(memsink_cfg)] = models["memsinks"]
    if targeted_cfg != memsink_cfg or "memsinks" not in models:
        regimes[label(targeted_cfg)], _ = memsinks_run("memsinks (forget regime)", "forget_memsinks", targeted_cfg)
    retrained = None
    if f.get("retrain", True):
        retrained = train_run("retrained without F", copy.deepcopy(base), setting.stream_without(sets[max(sizes)]),
                              False)
    t0 = time.time()
    rows = []
    for regime, model in regimes.items():
        rows += forgetting.evaluate_memsinks(model, setting, cfg, sets, keep, regime, seed)
    rows += forgetting.evaluate_standard(models["standard"], retrained, setting, cfg, sets, keep,
                                         [float(x) for x in f.get("posthoc_fractions", [])])
    timings["forget_eval"] = time.time() - t0
    val_docs = min(int(f.get("val_docs") or len(setting.validation)), len(setting.validation))
    return {"sizes": sizes, "keep": len(keep), "val_docs": val_docs,
            "regimes": {k: m.memsink_config.to_dict() for k, m in regimes.items()},
            "summary": forgetting.summarize(rows), "rows": rows}


def _versions() -> dict:
    import transformers

    return {"hf_memsinks": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
