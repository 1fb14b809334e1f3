"""The benchmark's config: typed sections with their defaults, read once from YAML and dotted
overrides. A misspelled key is an error naming the nearest valid one, a value of the wrong type an
error naming the key, and nothing is cast where it is used."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from hf_memsinks.config import REFERENCE_SWITCHES, MemSinkConfig, did_you_mean

from .sink_step import KINDS as SINK_STEPS

RUNS = ("standard", "memsinks", "dedup", "posthoc", "goldfish", "memsinks+goldfish", "forget")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
MODEL_TYPES = ("gpt2", "llama", "gpt_neox")
# integers that may be 0; every other integer must be positive
MAY_BE_ZERO = {"exposure_candidates", "warmup", "control", "repeated_natural", "repeated_canaries", "secret_canaries",
               "seed"}


@dataclass
class CorpusConfig:
    source: str = "embedded"  # "embedded", a .txt / .jsonl file, a save_to_disk folder or a Hub dataset
    text_field: str = "text"
    split: str = "train"


@dataclass
class TokenizerConfig:
    vocab_size: int = 1024  # of the byte-level BPE trained on the corpus
    path: str | None = None  # a tokenizer to load instead


@dataclass
class DataConfig:
    max_length: int
    repeated_natural: int
    repeated_canaries: int
    repetitions: int
    control: int
    validation: int
    canary_length: int | None = None  # default: max_length
    secret_canaries: int = 0  # "the secret code of NAME is DDDDDDDDD." sentences, repeated like the others
    secret_digits: int = 9


@dataclass
class ModelConfig:
    type: str = "gpt2"
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    mlp: int = 512


@dataclass
class TrainConfig:
    steps: int
    batch_size: int  # the global batch, split over processes
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    warmup: int = 50
    weight_decay: float = 0.1
    eval_every: int = 100
    curve_docs: int = 64
    precision: str = "auto"  # "auto": bf16 where a CUDA device has it, else fp32
    general_dropout: float = 0.0  # memsinks runs: dropout on general neurons only (pressure.py)
    general_weight_decay: float = 0.0  # memsinks runs: extra decoupled weight decay on general neurons only
    sink_optimizer: str = "adam"  # memsinks runs: another rule for the sinks' step (sink_step.py)
    repeated_only_ids: bool = False  # memsinks runs: an ID that occurs once in the stream becomes -1 (no sinks)


@dataclass
class EvalConfig:
    prefix: int = 16
    suffix: int = 16
    batch_size: int = 64
    mia_k: float = 0.2  # Min-K% and Min-K%++: the share of least likely tokens averaged
    exposure_candidates: int = 1000  # sampled candidate secrets per canary (capped at log2 of it + 1); 0: no exposure


@dataclass
class PosthocConfig:
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.3])


@dataclass
class GoldfishConfig:
    """Goldfish loss (hf_memsinks.data.goldfish): drop 1 target in k, by a hash of the h tokens ending at it."""

    k: int = 4
    h: int = 13
    hash: str = "table"
    seed: int = 0


@dataclass
class UnlearningConfig:
    """Post-hoc unlearning of F on the standard model (unlearning.py): full-batch AdamW
    at ``lr``, stopped at the last check (every ``check_every`` steps) where K's loss has risen by at
    most ``k_budget`` nats and the val loss by at most ``val_budget`` (relative), or at ``max_steps``."""

    methods: list[str] = field(default_factory=lambda: ["gradient_ascent", "grad_diff", "npo"])
    lr: float = 5e-4
    max_steps: int = 100
    check_every: int = 5
    k_budget: float = 0.1
    val_budget: float = 0.02
    beta: float = 0.1  # NPO's inverse temperature
    retain_batch: int = 16  # grad_diff's retained documents per step


@dataclass
class ForgetConfig:
    """Forget the first n repeated documents for each n in ``sizes``; ``memsinks`` (over the main
    memsinks section) is the regime trained for it: a small sink_active_prob keeps sinks apart."""

    sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    memsinks: dict | None = field(default_factory=lambda: {"sink_fraction": 0.5, "sink_active_prob": 0.05})
    posthoc_fractions: list[float] = field(default_factory=lambda: [0.05, 0.2])
    retrain: bool = True
    val_docs: int | None = 128
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)


@dataclass
class BenchmarkConfig:
    data: DataConfig
    train: TrainConfig
    name: str | None = None
    seed: int = 0
    threads: int | None = None
    workers: int = 1  # processes for runs that share no model (workers.py); each uses `threads`
    device: str = "auto"  # "auto": cuda when available, else cpu; pick GPUs with CUDA_VISIBLE_DEVICES
    save_models: bool = False
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memsinks: dict = field(default_factory=dict)  # MemSinkConfig's fields (reference: a mapping of PaperReference's)
    posthoc: PosthocConfig = field(default_factory=PosthocConfig)
    goldfish: GoldfishConfig = field(default_factory=GoldfishConfig)
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    runs: list[str] = field(default_factory=lambda: list(RUNS))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def memsink_config(self) -> MemSinkConfig:
        return MemSinkConfig(**self.memsinks)

    def forget_memsink_config(self) -> MemSinkConfig:
        return MemSinkConfig(**{**self.memsinks, **(self.forget.memsinks or {})})


# ---- reading and checking -----------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, kind: type | None = None):
    """YAML config over the defaults; ``overrides`` are ``dotted.key=value`` (YAML values);
    ``kind``: the config class (default ``BenchmarkConfig``; the fine-tuning benchmark's extends it)."""
    kind = kind or BenchmarkConfig
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of config sections, got {type(loaded).__name__}")
    check(loaded, str(path), kind)
    raw = _merge(_defaults(kind), loaded)
    for item in overrides or []:
        _apply_override(raw, item)
        check(raw, f"override {item!r}", kind)
    for section in ("data", "train"):
        if section not in raw:
            raise ValueError(f"config {path} has no {section!r} section")
    for section in ("data", "train"):
        for f in dataclasses.fields(_section_type(section)):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in raw[section]:
                raise ValueError(f"config {path}: {section}.{f.name} is required")
    cfg = _build(kind, raw)
    _check_values(cfg)
    return cfg


def check(raw: dict, where: str = "config", kind: type | None = None) -> None:
    """Every key known, every value of its type."""
    _check_section(raw, kind or BenchmarkConfig, "", where)


def _check_section(raw: Any, kind: type, prefix: str, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    hints = typing.get_type_hints(kind)
    for key, value in raw.items():
        name = prefix + key
        if key not in fields:
            raise ValueError(f"{where}: unknown key {name!r}{_nearest(key, fields, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {name!r} must be a section (a mapping), got {value!r}")
            _check_section(value, hint, name + ".", where)
        elif name in ("memsinks", "forget.memsinks"):
            if value is not None or name == "memsinks":
                _check_memsinks_section(value, name, where)
        elif not _type_ok(value, hint):
            raise ValueError(f"{where}: '{name}' must be {_describe(hint)}, got {value!r}")
        elif prefix and hint in (int, int | None) and value is not None and value < (0 if key in MAY_BE_ZERO else 1):
            raise ValueError(f"{where}: '{name}' must be a positive integer, got {value!r}")


def _check_memsinks_section(value: Any, name: str, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {name!r} must be a mapping of MemSinkConfig fields, got {value!r}")
    fields = {f.name for f in dataclasses.fields(MemSinkConfig)}
    for k in value:
        if k in REFERENCE_SWITCHES:
            raise ValueError(f"{where}: '{name}.{k}' is one of the published code's switches: write it as "
                             f"'{name}.reference.{k}'")
        if k not in fields:
            raise ValueError(f"{where}: unknown key '{name}.{k}'{_nearest(k, fields, name + '.')}")


def _check_values(cfg: BenchmarkConfig) -> None:
    """What types cannot say: known runs and model types, valid MemSink and Goldfish settings,
    forget sizes that keep some repeated documents."""
    from hf_memsinks.data.goldfish import check_goldfish

    unknown = set(cfg.runs) - set(RUNS)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}; choose from {RUNS}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.model.type not in MODEL_TYPES:
        raise ValueError(f"model.type must be gpt2, llama or gpt_neox, got {cfg.model.type!r}")
    if cfg.device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {cfg.device!r} (pick GPUs with CUDA_VISIBLE_DEVICES)")
    if cfg.train.precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {cfg.train.precision!r}")
    if not 0.0 <= cfg.train.general_dropout < 1.0 or cfg.train.general_weight_decay < 0.0:
        raise ValueError("train.general_dropout must be in [0, 1) and train.general_weight_decay >= 0, got "
                         f"{cfg.train.general_dropout!r} and {cfg.train.general_weight_decay!r}")
    if cfg.train.sink_optimizer not in ("adam", *SINK_STEPS):
        raise ValueError(f"train.sink_optimizer must be one of {('adam', *SINK_STEPS)}, got "
                         f"{cfg.train.sink_optimizer!r}")
    cfg.memsink_config()  # fail early on a bad MemSink setting
    cfg.forget_memsink_config()
    check_goldfish(cfg.goldfish.k, cfg.goldfish.h, cfg.goldfish.hash)
    methods = set(cfg.forget.unlearning.methods) - {"gradient_ascent", "grad_diff", "npo"}
    if methods:
        raise ValueError(f"unknown forget.unlearning.methods {sorted(methods)}; choose from gradient_ascent, "
                         "grad_diff, npo")
    repeated = cfg.data.repeated_natural + cfg.data.repeated_canaries
    sizes = cfg.forget.sizes
    if "forget" in cfg.runs and (not sizes or min(sizes) < 1 or max(sizes) >= repeated):
        raise ValueError(f"forget.sizes {sizes}: each must be 1 .. {repeated - 1} "
                         "(some repeated documents must be kept)")


# ---- helpers ------------------------------------------------------------------------------------


def _section_type(name: str) -> type:
    return typing.get_type_hints(BenchmarkConfig)[name]


def _defaults(kind: type) -> dict:
    """The default value of every field that has one, as nested plain dicts."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(kind):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def _build(kind: type, raw: dict):
    hints = typing.get_type_hints(kind)
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value)
        elif hint is float and isinstance(value, int):
            value = float(value)
        elif typing.get_origin(hint) is list and typing.get_args(hint) == (float,):
            value = [float(v) for v in value]
        values[key] = value
    return kind(**values)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. train.steps=200)")
    key, text = item.split("=", 1)
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: not a valid YAML value ({' '.join(str(err).split())})") from None


def _nearest(key: str, valid, prefix: str = "") -> str:
    hint = did_you_mean(prefix + key, [prefix + v for v in valid])
    return hint or f" (valid: {', '.join(sorted(valid))})"


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list or hint is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if args and type(None) in args:  # X | None
        return value is None or any(_type_ok(value, a) for a in args if a is not type(None))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if args and type(None) in args:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))
