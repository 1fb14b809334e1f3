"""``python -m benchmarks.memorization repetition CONFIG.yaml``: MemSinks where repetition is worth
something, so that dedup and one epoch lose what it teaches.

Two settings (``repetition.setting``):

* ``domain`` (from scratch): a background corpus seen once, plus ``repetition.documents`` documents
  of another domain, each repeated ``data.repetitions`` times and shuffled in (the paper's
  TinyStories inside SlimPajama). Validation: held-out documents of the domain. Dedup sees each
  domain document once, fresh background fills its slots.
* ``epochs`` (fine-tune): a base pretrained on the corpus (seen once), fine-tuned on the domain's
  ``documents`` private documents for each of ``repetition.epochs`` epochs (a fresh shuffle per
  epoch). Validation: held-out documents of the domain; the base's domain is the old one. "Dedup"
  here is one epoch.

Members are the first ``data.repeated_natural`` of the repeated documents (and the
``data.secret_canaries`` secret sentences, repeated like them); non-members are ``data.control``
held-out documents of the domain. Per row: the domain's validation loss and the share of
repetition's benefit it keeps (against the standard run and dedup or one epoch), old-domain loss,
the gap closed against the standard run, extraction, every attack's membership AUC and the
secrets' exposure. Memsinks rows are measured with their sinks removed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import torch

from hf_memsinks.config import MemSinkConfig
from hf_memsinks.evaluation.membership import ATTACKS, roc_auc
from hf_memsinks.model.add_sinks import get_memsink_model

from .config import BenchmarkConfig, CorpusConfig, load_config
from .corpus import load_documents, load_or_train_tokenizer
from .decay import GeneralShare
from .finetune_config import PretrainConfig
from .gate import LossGate
from .metrics import doc_losses, measure
from .secrets import make_secrets
from .setting import Setting, _streams
from .training import build_model, make_accelerator, train

SETTINGS = ("domain", "epochs")
METHODS = ("standard", "dedup", "goldfish", "memsinks")


@dataclass
class Row:
    """One training of the table. ``method``: ``standard`` (the full fine-tune in ``epochs``),
    ``dedup`` (one epoch in ``epochs``), ``goldfish`` or ``memsinks`` (``memsinks``: MemSinkConfig
    fields; ``recipe``: over ``MemSinkConfig.for_finetuning()``)."""

    name: str
    method: str = "standard"
    memsinks: dict = field(default_factory=dict)
    recipe: bool = False
    gate: dict | None = None  # memsinks: LossGate's settings (gate.py), over general_sightings=0
    decay: dict | None = None  # memsinks: GeneralShare's settings (decay.py): the general path's share of repeats

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"repetition row {self.name!r}: method must be one of {METHODS}, got {self.method!r}")
        for option in ("gate", "decay"):
            if getattr(self, option) is not None and self.method != "memsinks":
                raise ValueError(f"repetition row {self.name!r}: {option} needs method memsinks")
        if self.gate is not None and self.decay is not None:
            raise ValueError(f"repetition row {self.name!r}: gate or decay, not both")
        if self.decay is not None:
            GeneralShare(**self.decay)
            if self.memsinks.get("general_sightings") is not None:
                raise ValueError(f"repetition row {self.name!r}: decay runs on the default forward "
                                 "(general_sightings unset)")
        if self.method == "memsinks":
            self.memsink_config()

    def memsink_config(self) -> MemSinkConfig:
        fields = {**self.memsinks, **({"general_sightings": 0, "sightings_by": "ids"} if self.gate is not None else {})}
        return MemSinkConfig.for_finetuning(**fields) if self.recipe else MemSinkConfig(**fields)


@dataclass
class RepetitionConfig:
    setting: str = "domain"
    domain: CorpusConfig = field(default_factory=lambda: CorpusConfig(source="data/manpages.jsonl"))
    documents: int = 800  # the domain's repeated (private) documents
    epochs: list[int] = field(default_factory=lambda: [3, 8])  # setting epochs: one fine-tune per entry
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # setting epochs: the base
    rows: list[dict] = field(default_factory=lambda: [{"name": "standard"}, {"name": "dedup", "method": "dedup"}])

    def row_specs(self) -> list[Row]:
        names = {f.name for f in dataclasses.fields(Row)}
        specs = []
        for raw in self.rows:
            unknown = set(raw) - names
            if unknown or "name" not in raw:
                raise ValueError(f"repetition row {raw}: needs a name and known keys; unknown {sorted(unknown)}")
            specs.append(Row(**raw))
        return specs


@dataclass
class RepetitionBenchmarkConfig(BenchmarkConfig):
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    runs: list[str] = field(default_factory=list)


def load_repetition_config(path, overrides: list[str] | None = None) -> RepetitionBenchmarkConfig:
    cfg = load_config(path, overrides, kind=RepetitionBenchmarkConfig)
    rep = cfg.repetition
    if rep.setting not in SETTINGS:
        raise ValueError(f"repetition.setting must be one of {SETTINGS}, got {rep.setting!r}")
    specs = rep.row_specs()
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"repetition.rows: names must differ, got {names}")
    for method in ("standard", "dedup"):
        if sum(s.method == method for s in specs) != 1:
            raise ValueError(f"repetition.rows: exactly one row of method {method!r} (the reference), got "
                             f"{sum(s.method == method for s in specs)}")
    if cfg.data.repeated_natural > rep.documents:
        raise ValueError(f"data.repeated_natural ({cfg.data.repeated_natural} measured) > repetition.documents")
    return cfg


# ---- the settings -------------------------------------------------------------------------------------


@dataclass
class RepetitionSetting(Setting):
    """A :class:`Setting` whose ``natural`` are the measured members; ``epochs``: the fine-tune's
    passes (``epoch_streams[e]`` for ``e`` epochs, ``epoch_streams[1]`` is one epoch), the base's
    pretraining stream and the old domain's validation set."""

    epoch_streams: dict[int, list[list[int]]] = field(repr=False, default_factory=dict)
    pretrain_stream: list[list[int]] = field(repr=False, default_factory=list)
    old_validation: list[list[int]] = field(repr=False, default_factory=list)
    base_losses: tuple[torch.Tensor, torch.Tensor] | None = field(repr=False, default=None)  # members', controls'


def build_repetition(cfg: RepetitionBenchmarkConfig) -> RepetitionSetting:
    rep, data, batch, seed = cfg.repetition, cfg.data, cfg.train.batch_size, cfg.seed
    n_domain = rep.documents + data.control + data.validation
    domain_texts = load_documents(rep.domain.source, None, text_field=rep.domain.text_field,
                                  split=rep.domain.split, seed=seed)
    rng = random.Random(seed)
    rng.shuffle(domain_texts)
    if len(domain_texts) < n_domain:
        raise ValueError(f"{rep.domain.source} has {len(domain_texts)} documents; the setting needs {n_domain}")
    domain_texts = domain_texts[:n_domain]
    if rep.setting == "domain":
        slots = cfg.train.steps * batch - (rep.documents + data.secret_canaries) * data.repetitions
        if slots <= 0:
            raise ValueError("train.steps x batch_size cannot hold the repeated domain documents")
        n_background = slots + (rep.documents + data.secret_canaries) * (data.repetitions - 1)
    else:
        n_background = rep.pretrain.steps * batch + data.validation
    background = load_documents(cfg.corpus.source, None if cfg.corpus.source != "embedded" else n_background,
                                text_field=cfg.corpus.text_field, split=cfg.corpus.split, seed=seed)
    rng.shuffle(background)
    if len(background) < n_background:
        raise ValueError(f"{cfg.corpus.source} has {len(background)} documents; the setting needs {n_background}")
    background = background[:n_background]
    tokenizer = load_or_train_tokenizer(cfg.tokenizer, background[:10000] + domain_texts[:10000])
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode(texts: list[str]) -> list[list[int]]:
        return [([eos] + e)[:data.max_length] for e in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    domain, other = encode(domain_texts), encode(background)
    repeated, control = domain[:rep.documents], domain[rep.documents:rep.documents + data.control]
    validation = domain[rep.documents + data.control:]
    secrets = control_secrets = None
    if data.secret_canaries:
        secrets, control_secrets = make_secrets(tokenizer, data.secret_canaries, data.secret_digits, seed, eos,
                                                data.max_length)
    private = repeated + (secrets.docs if secrets else [])
    measured = repeated[:data.repeated_natural]
    common = dict(tokenizer=tokenizer, max_length=data.max_length, pad_id=pad_id, natural=measured, canaries=[],
                  control_natural=control, control_canaries=[], validation=validation, secrets=secrets,
                  control_secrets=control_secrets)
    if rep.setting == "domain":
        general, fresh = other[:slots], other[slots:]
        stream, dedup = _streams(general, private, fresh, data.repetitions, rng)
        return RepetitionSetting(**common, stream=stream, dedup_stream=dedup, general_sample=general[:64], fresh=fresh)
    old_validation, pretrain = other[:data.validation], other[data.validation:]
    epochs = {}
    for e in sorted(set(rep.epochs) | {1}):
        passes = []
        order = random.Random(seed * 1000 + 17)  # the same first epochs for every length
        for _ in range(e):
            one = list(private)
            order.shuffle(one)
            passes += one
        epochs[e] = passes[:len(passes) // batch * batch]
    return RepetitionSetting(**common, stream=epochs[max(epochs)], dedup_stream=epochs[1], epoch_streams=epochs,
                             pretrain_stream=pretrain, old_validation=old_validation)


# ---- runs ---------------------------------------------------------------------------------------------


def run_repetition(cfg: RepetitionBenchmarkConfig, out_dir) -> dict:
    """Every row of the config at its seed (``cfg.seed``); report.json and report.md in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    accelerator = make_accelerator(cfg)
    setting = build_repetition(cfg)
    rep = cfg.repetition
    tables = {}
    if rep.setting == "domain":
        tables[f"R={cfg.data.repetitions}"] = _table(cfg, setting, None, setting.stream, setting.dedup_stream,
                                                     accelerator, out)
    else:
        base = build_model(cfg, len(setting.tokenizer), setting.max_length).to(accelerator.device)
        p = rep.pretrain
        pre = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, steps=p.steps, lr=p.lr, warmup=p.warmup, min_lr_ratio=p.min_lr_ratio, eval_every=p.steps))
        train(base, setting, setting.pretrain_stream, pre, with_ids=False, label="pretrain", accelerator=accelerator)
        tables["pretrained"] = {"pretrained": evaluate(base, setting, cfg)}
        setting.base_losses = member_losses(base, setting, cfg)
        for e in rep.epochs:
            tables[f"E={e}"] = _table(cfg, setting, base, setting.epoch_streams[e], setting.epoch_streams[1],
                                      accelerator, out)
    report = {"seed": cfg.seed, "setting": rep.setting, "tables": tables, "config": cfg.to_dict(),
              "describe": setting.describe(), "seconds": round(time.time() - t0, 1),
              "versions": {"torch": torch.__version__, "threads": torch.get_num_threads()}}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(markdown([report]))
    return report


def _table(cfg, setting, base, stream, once, accelerator, out: Path) -> dict:
    """Every row trained on ``stream`` (dedup's on ``once``), each appended to rows.jsonl as it ends, then
    measured against the standard and dedup rows."""
    rows = {}
    for spec in cfg.repetition.row_specs():
        t0 = time.time()
        docs = stream if spec.method != "dedup" else once
        rows[spec.name] = train_row(spec, cfg, setting, base, docs, accelerator)
        rows[spec.name].update(seconds=round(time.time() - t0, 1), method=spec.method,
                               steps=len(docs) // cfg.train.batch_size)
        with (out / "rows.jsonl").open("a") as f:
            f.write(json.dumps({"seed": cfg.seed, "row": spec.name, **rows[spec.name]}, default=float) + "\n")
    std = next(r for r in rows.values() if r["method"] == "standard")
    low = next(r for r in rows.values() if r["method"] == "dedup")
    for r in rows.values():
        r.update(relative(r, std, low))
    return rows


def train_row(spec: Row, cfg, setting: RepetitionSetting, base, stream, accelerator) -> dict:
    """One row trained on ``stream`` (from ``base`` in the epochs setting, from scratch otherwise) and
    measured, sinks removed."""
    if base is None:
        model = build_model(cfg, len(setting.tokenizer), setting.max_length)
    else:
        model = copy.deepcopy(base)
    sinks = spec.method == "memsinks"
    if sinks:
        model = get_memsink_model(model, spec.memsink_config())
    model = model.to(accelerator.device)
    steps = len(stream) // cfg.train.batch_size
    train_cfg = dataclasses.replace(cfg.train, steps=steps, eval_every=steps)
    goldfish = cfg.goldfish if spec.method == "goldfish" else None
    gate = LossGate(**spec.gate) if spec.gate is not None else None
    share = GeneralShare(**spec.decay) if spec.decay is not None else None
    if share is not None and accelerator.num_processes > 1:
        raise ValueError(f"repetition row {spec.name!r}: decay counts sightings in one process only")
    train(model, setting, stream, dataclasses.replace(cfg, train=train_cfg), with_ids=sinks, label=spec.name,
          goldfish=goldfish, accelerator=accelerator, route=gate,
          loss=share.loss if share is not None else None,
          on_optimizer=(lambda opt: share.attach(model, opt)) if share is not None else None)
    if sinks:
        model = model.remove_sinks()
    out = evaluate(model.eval(), setting, cfg)
    if gate is not None:
        out["gate"] = {"repeats_to_general": gate.general, "repeats_to_sinks": gate.sinks, "ref": gate.ref}
    if share is not None:
        out["decay"] = share.report()
    return out


def member_losses(model, setting: RepetitionSetting, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    return (doc_losses(model, setting.natural, cfg, setting.pad_id),
            doc_losses(model, setting.control_natural, cfg, setting.pad_id))


def evaluate(model, setting: RepetitionSetting, cfg) -> dict:
    """``measure``, the old domain's loss, and with a base model (``epochs``): the gap over the base's
    own gap between the same members and controls (``calibrated_gap``: the two sets' difference in
    difficulty taken out) and the reference attack, which scores a document by how much lower its
    loss is than the base's (the public base model is what a reviewer compares against)."""
    out = measure(model, setting, cfg)
    if setting.old_validation:
        out["old_val_loss"] = doc_losses(model, setting.old_validation, cfg, setting.pad_id).mean().item()
    m, c = member_losses(model, setting, cfg)
    if setting.base_losses is not None:
        base_m, base_c = setting.base_losses
        m, c = m - base_m, c - base_c
        out["calibrated_gap"] = float(c.mean() - m.mean())
        auc = roc_auc(-m, -c)
        out["mia_auc"]["reference"] = {"natural": auc, "all": auc}
    out["gap_se"] = float((c.var() / c.numel() + m.var() / m.numel()).sqrt())  # of the gap the row reports
    return out


def relative(run: dict, std: dict, low: dict) -> dict:
    """Gap closed against the standard run (on the calibrated gap where there is a base); the share of
    repetition's validation benefit kept: (low - run) / (low - standard), ``low`` being dedup or one epoch."""
    benefit = low["val_loss"] - std["val_loss"]
    gap = "calibrated_gap" if "calibrated_gap" in std else "memorization_gap"
    out = {"gap_closure": 1.0 - run[gap] / std[gap],
           "benefit_kept": (low["val_loss"] - run["val_loss"]) / benefit if benefit else float("nan"),
           "val_ratio": run["val_loss"] / std["val_loss"]}
    if "old_val_loss" in run:
        out["old_ratio"] = run["old_val_loss"] / std["old_val_loss"]
    return out


# ---- the report ---------------------------------------------------------------------------------------


def _cell(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


def markdown(reports: list[dict]) -> str:
    """One table per setting length, each cell a value per seed (``seed 0 / seed 1``; ``-`` where a seed's
    run lacks the row: the first report's rows are the table's)."""
    first = reports[0]
    lines = [f"# Repetition benchmark: {first['setting']} (seeds {', '.join(str(r['seed']) for r in reports)})", ""]
    for key in first["tables"]:
        rows = first["tables"][key]
        if key == "pretrained":
            pre = [r["tables"][key]["pretrained"] for r in reports]
            lines += [f"Pretrained base: domain val {_cell([p['val_loss'] for p in pre], '.3f')}, old domain "
                      f"{_cell([p['old_val_loss'] for p in pre], '.3f')}", ""]
            continue
        old = "old_val_loss" in next(iter(rows.values()))
        attacks = [a for a in (*ATTACKS, "reference") if a in next(iter(rows.values()))["mia_auc"]]
        gap = "calibrated_gap" if "calibrated_gap" in next(iter(rows.values())) else "memorization_gap"
        secrets = "secret" in next(iter(rows.values()))["mia_auc"]["loss"]
        head = ["row", "domain val", "kept", *(["old val", "old ratio"] if old else []), "gap", "gap closed",
                "extraction", *[f"AUC {a}" for a in attacks], *(["secrets' AUC"] if secrets else []),
                "exposure trained / unseen (bits)"]
        noise = [r["tables"][key][name] for r in reports for name, row in rows.items() if row["method"] == "standard"]
        measurable = all(s[gap] > 2 * s.get("gap_se", 0.0) for s in noise)
        lines += [f"## {key}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in rows:
            per = [r["tables"][key].get(name) for r in reports]  # None: a row this seed's run did not have

            def col(value, fmt: str) -> str:
                return " / ".join("-" if p is None else format(value(p), fmt) for p in per)

            cells = [name, col(lambda p: p["val_loss"], ".3f"), col(lambda p: p["benefit_kept"], ".2f")]
            if old:
                cells += [col(lambda p: p["old_val_loss"], ".3f"), col(lambda p: p["old_ratio"], ".3f")]
            cells += [col(lambda p: p[gap], ".3f"),
                      col(lambda p: p["gap_closure"], ".2f") if measurable else "n/a",
                      col(lambda p: p["extraction_rate"], ".2f")]
            cells += [col(lambda p, a=a: p["mia_auc"][a]["natural"], ".2f") for a in attacks]
            if secrets:
                cells.append(col(lambda p: max(p["mia_auc"][a]["secret"] for a in ATTACKS), ".2f"))
            cells.append(" / ".join(f"{p['exposure']['trained']['mean']:.1f} vs {p['exposure']['control']['mean']:.1f}"
                                    if p is not None and p.get("exposure") else "-" for p in per))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("kept: share of repetition's domain-val benefit (dedup or one epoch -> standard) kept; gap: "
                 "held-out minus member loss (in epochs: minus the pretrained base's own gap between the same "
                 "documents, so that only what the fine-tune did counts); gap closed: against the standard run, "
                 "n/a where the standard run's gap is under two standard errors; AUC: each attack on the repeated "
                 "documents against held-out ones; secrets' AUC: the strongest attack on the secret sentences "
                 "(8 against 8: a null spread of 0.15); "
                 "reference: members scored by how far their loss fell below the base's; memsinks rows with sinks "
                 "removed.")
    return "\n".join(lines) + "\n"


def combine(out_dirs: list[str], out: str) -> str:
    """The report of several seeds' runs (each a ``report.json``), written to ``out``."""
    reports = [json.loads((Path(d) / "report.json").read_text()) for d in out_dirs]
    text = markdown(reports)
    Path(out).write_text(text)
    means = {}
    for key in reports[0]["tables"]:
        means[key] = {name: {k: fmean(r["tables"][key][name][k] for r in reports if name in r["tables"][key])
                             for k in ("val_loss", "benefit_kept", "gap_closure", "old_val_loss", "old_ratio",
                                       "memorization_gap", "calibrated_gap")
                             if k in reports[0]["tables"][key][name]}
                      for name in reports[0]["tables"][key]}
    Path(out).with_suffix(".json").write_text(json.dumps(means, indent=1, default=float))
    return text
