"""The fine-tuning benchmark's config: the benchmark's sections (``data`` and ``train`` describe the
fine-tune), plus a ``finetune`` section: the new domain, how the base model is pretrained (or
where it is loaded from), the replay share, the seeds and the runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hf_memsinks.config import MemSinkConfig

from .config import BenchmarkConfig, CorpusConfig, load_config
from .sink_step import KINDS as SINK_STEPS

METHODS = ("full", "lora", "goldfish", "dedup", "memsinks")


@dataclass
class PretrainConfig:
    """The base model's training on the old domain (``train``'s batch size and weight decay)."""

    steps: int = 1200
    lr: float = 1.5e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1


@dataclass
class FinetuneRun:
    """One fine-tune of the base model.

    ``method``: ``full`` (every parameter), ``lora`` (adapters only), ``goldfish``, ``dedup`` or
    ``memsinks`` (``memsinks`` are MemSinkConfig fields; ``lora_r`` > 0 adds LoRA with the sinks
    fully trainable; ``mode`` defaults to ``add``); ``lr`` / ``weight_decay`` / ``sink_optimizer``
    (memsinks runs: benchmarks/memorization/sink_step.py) / ``repeated_only_ids`` override ``train``'s."""

    name: str
    method: str = "full"
    memsinks: dict = field(default_factory=dict)
    lora_r: int = 0
    recipe: bool = False  # memsinks: MemSinkConfig.for_finetuning(**memsinks)
    lr: float | None = None
    weight_decay: float | None = None
    sink_optimizer: str | None = None
    repeated_only_ids: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"finetune run {self.name!r}: method must be one of {METHODS}, got {self.method!r}")
        if self.method == "lora" and self.lora_r < 1:
            raise ValueError(f"finetune run {self.name!r}: method lora needs lora_r >= 1")
        if self.recipe and self.method != "memsinks":
            raise ValueError(f"finetune run {self.name!r}: recipe: true needs method memsinks")
        if self.sink_optimizer is not None and (self.method != "memsinks" or self.sink_optimizer not in (
                "adam", *SINK_STEPS)):
            raise ValueError(f"finetune run {self.name!r}: sink_optimizer needs method memsinks and one of "
                             f"{('adam', *SINK_STEPS)}, got {self.sink_optimizer!r}")
        if self.method == "memsinks":
            self.memsink_config()

    def memsink_config(self) -> MemSinkConfig:
        if self.recipe:
            return MemSinkConfig.for_finetuning(**self.memsinks)
        return MemSinkConfig(**{"mode": "add", **self.memsinks})


@dataclass
class FinetuneConfig:
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(source="data/manpages.jsonl"))
    base: str | None = None  # a local pretrained model (and its tokenizer) instead of pretraining in the run
    save_base: str | None = None  # where to save the base pretrained in the run (reuse it with base:)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    replay: float = 0.0  # share of the fine-tune's once-seen documents that are old-domain
    seeds: list[int] = field(default_factory=lambda: [0])
    recipe: str | None = None  # the run the summary reports
    reference: str = "full"  # the run gap closure and loss ratios are measured against
    runs: list[dict] = field(default_factory=lambda: [{"name": "full"}])

    def run_specs(self) -> list[FinetuneRun]:
        specs = []
        for raw in self.runs:
            names = {f.name for f in dataclasses.fields(FinetuneRun)}
            unknown = set(raw) - names
            if unknown or "name" not in raw:
                raise ValueError(f"finetune run {raw}: needs a name and known keys; unknown {sorted(unknown)} "
                                 f"(valid: {sorted(names)})")
            specs.append(FinetuneRun(**raw))
        return specs


@dataclass
class FinetuneBenchmarkConfig(BenchmarkConfig):
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runs: list[str] = field(default_factory=list)  # (the from-scratch benchmark's runs: none here)


def load_finetune_config(path, overrides: list[str] | None = None) -> FinetuneBenchmarkConfig:
    """A fine-tuning config: checked like the benchmark's, then its runs, recipe and reference."""
    cfg = load_config(path, overrides, kind=FinetuneBenchmarkConfig)
    ft = cfg.finetune
    names = [s.name for s in ft.run_specs()]
    if len(set(names)) != len(names):
        raise ValueError(f"finetune.runs: run names must differ, got {names}")
    for key in ("recipe", "reference"):
        if getattr(ft, key) is not None and getattr(ft, key) not in names:
            raise ValueError(f"finetune.{key} {getattr(ft, key)!r} is not one of the runs {names}")
    if not 0.0 <= ft.replay < 1.0:
        raise ValueError(f"finetune.replay must be in [0, 1), got {ft.replay}")
    return cfg
