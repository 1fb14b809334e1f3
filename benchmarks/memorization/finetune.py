"""``python -m benchmarks.memorization finetune CONFIG.yaml``: the user's path. A base model is pretrained on the old
domain (or loaded), then every configured run fine-tunes a copy of it on the new domain, whose
stream holds repeated private documents (natural and canaries). Per run: memorization against the
reference fine-tune (``gap_closure``, natural / canary parts, extraction), the new domain's
validation loss ratio (``val_loss_ratio``: what the fine-tune was for), the old domain's
(``retention_loss_ratio``: what it must not wipe), and the training cost (trainable and extra
parameters, step-time ratio). Memsinks runs are measured with their sinks removed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from statistics import mean

import torch

from hf_memsinks.model.add_sinks import get_memsink_model

from .finetune_config import FinetuneBenchmarkConfig, FinetuneRun
from .metrics import doc_losses, measure
from .training import build_model, make_accelerator, train
from .two_domains import TwoDomainSetting, build_two_domains

KEYS = ("gap_closure", "gap_closure_natural", "gap_closure_canary", "val_loss_ratio", "retention_loss_ratio",
        "extraction_rate", "extraction_rate_natural", "extraction_rate_canary", "val_loss", "old_val_loss",
        "memorization_gap", "trainable_params", "extra_params", "step_time_ratio")


def run_finetune(cfg: FinetuneBenchmarkConfig, out_dir: str | os.PathLike) -> dict:
    """Every run at every seed; report.json and report.md in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.jsonl").unlink(missing_ok=True)
    seeds = [one_seed(dataclasses.replace(cfg, seed=s), out / "runs.jsonl") for s in cfg.finetune.seeds]
    report = combine(cfg, seeds)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    from .finetune_report import write_markdown

    write_markdown(report, out)
    return report


def one_seed(cfg: FinetuneBenchmarkConfig, log: Path | None = None) -> dict:
    """The base and every run at ``cfg.seed``; each run's metrics appended to ``log`` (JSON lines) as it ends."""
    t0 = time.time()
    accelerator = make_accelerator(cfg)
    setting = build_two_domains(_with_base_tokenizer(cfg))
    base = pretrained_base(cfg, setting, accelerator)
    runs = {"pretrained": evaluate(base, setting, cfg)}
    seconds = {}
    for spec in cfg.finetune.run_specs():
        runs[spec.name], seconds[spec.name] = fine_tune(spec, base, setting, cfg, accelerator)
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps({"seed": cfg.seed, "run": spec.name, "seconds": seconds[spec.name],
                                    **relative(runs[spec.name], runs.get(cfg.finetune.reference, runs[spec.name])),
                                    **runs[spec.name]}) + "\n")
    ref = cfg.finetune.reference
    for name, m in runs.items():
        m.update(relative(m, runs[ref]))
        if name in seconds:
            m["step_time_ratio"] = seconds[name] / seconds[ref]
    return {"seed": cfg.seed, "runs": runs, "setting": setting.describe(), "seconds": round(time.time() - t0, 1)}


def _with_base_tokenizer(cfg):
    if cfg.finetune.base and not cfg.tokenizer.path:
        return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=cfg.finetune.base))
    return cfg


def pretrained_base(cfg, setting: TwoDomainSetting, accelerator):
    """The base model: loaded from ``finetune.base``, or trained on the old-domain stream."""
    ft = cfg.finetune
    if ft.base:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(ft.base).to(accelerator.device)
    p = ft.pretrain
    pre = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=p.steps, lr=p.lr, warmup=p.warmup,
                                                             min_lr_ratio=p.min_lr_ratio, eval_every=p.steps))
    base = build_model(cfg, len(setting.tokenizer), setting.max_length).to(accelerator.device)
    train(base, setting, setting.pretrain_stream, pre, with_ids=False, label="pretrain", accelerator=accelerator)
    if ft.save_base and accelerator.is_main_process:
        base.save_pretrained(ft.save_base)
        setting.tokenizer.save_pretrained(ft.save_base)
    return base


def fine_tune(spec: FinetuneRun, base, setting: TwoDomainSetting, cfg, accelerator) -> tuple[dict, float]:
    """Train a copy of ``base`` as ``spec`` says; its metrics (sinks removed) and training seconds."""
    model = copy.deepcopy(base)
    n_base = sum(p.numel() for p in model.parameters())
    sinks = spec.method == "memsinks"
    if sinks:
        model = get_memsink_model(model, spec.memsink_config())
    trained = model
    if spec.lora_r:
        trained = _with_lora(model, spec.lora_r, sinks)
    t = dataclasses.replace(cfg.train, eval_every=cfg.train.steps, lr=spec.lr or cfg.train.lr,
                            weight_decay=_weight_decay(spec, cfg),
                            sink_optimizer=spec.sink_optimizer or cfg.train.sink_optimizer,
                            repeated_only_ids=cfg.train.repeated_only_ids if spec.repeated_only_ids is None
                            else spec.repeated_only_ids)
    run_cfg = dataclasses.replace(cfg, train=t)
    stream = setting.dedup_stream if spec.method == "dedup" else setting.stream
    goldfish = cfg.goldfish if spec.method == "goldfish" else None
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    extra = sum(p.numel() for p in trained.parameters()) - n_base
    t0 = time.time()
    train(trained, setting, stream, run_cfg, with_ids=sinks, label=spec.name, goldfish=goldfish,
          accelerator=accelerator)
    seconds = time.time() - t0
    if spec.lora_r:
        model = trained.merge_and_unload()
    if sinks:
        model = model.remove_sinks()
    model.eval()
    return {**evaluate(model, setting, cfg), "trainable_params": trainable, "extra_params": extra}, seconds


def _weight_decay(spec: FinetuneRun, cfg) -> float:
    """The run's weight decay; 0 with LoRA + sinks, as the rows in docs/finetune.md were measured (the
    sinks then trained through their whole weight, whose frozen general part AdamW's decay would shrink;
    with the sinks stored apart it is out of reach)."""
    if spec.lora_r and spec.method == "memsinks":
        return 0.0
    return cfg.train.weight_decay if spec.weight_decay is None else spec.weight_decay


def _with_lora(model, r: int, sinks: bool):
    from peft import LoraConfig, get_peft_model

    from hf_memsinks.integrations.peft import train_sinks

    targets = {"gpt2": ["c_attn", "c_proj", "c_fc"]}.get(model.config.model_type, "all-linear")
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0,
                                               fan_in_fan_out=model.config.model_type == "gpt2"))
    if sinks:
        train_sinks(wrapped)
    return wrapped


def evaluate(model, setting: TwoDomainSetting, cfg) -> dict:
    """``measure`` on the new domain, plus the old domain's validation loss."""
    out = measure(model, setting, cfg)
    out["old_val_loss"] = doc_losses(model, setting.old_validation, cfg, setting.pad_id).mean().item()
    return out


def relative(run: dict, ref: dict) -> dict:
    """Gap closed against the reference fine-tune, new- and old-domain validation loss ratios."""
    out = {"gap_closure": 1.0 - run["memorization_gap"] / ref["memorization_gap"],
           "val_loss_ratio": run["val_loss"] / ref["val_loss"],
           "retention_loss_ratio": run["old_val_loss"] / ref["old_val_loss"]}
    for kind in ("natural", "canary"):
        key = f"memorization_gap_{kind}"
        if key in run:
            out[f"gap_closure_{kind}"] = 1.0 - run[key] / ref[key]
    return out


def combine(cfg, seeds: list[dict]) -> dict:
    """Per run, the mean over seeds of every key (and each seed's value); the summary: the recipe's."""
    table = {}
    for name in seeds[0]["runs"]:
        per_seed = [s["runs"][name] for s in seeds]
        table[name] = {k: mean(r[k] for r in per_seed) for k in KEYS if all(k in r for r in per_seed)}
        table[name]["per_seed"] = {k: [r[k] for r in per_seed] for k in KEYS if all(k in r for r in per_seed)}
    recipe = cfg.finetune.recipe
    summary = {"recipe": recipe, **{k: v for k, v in table[recipe].items() if k != "per_seed"}} if recipe else {}
    return {"summary": summary, "runs": table, "seeds": seeds, "config": cfg.to_dict(),
            "versions": {"torch": torch.__version__, "threads": torch.get_num_threads()}}
