"""``python -m benchmarks.memorization attribute``: where the canaries' gap that survives sink removal lives.

Two memsinks models from the same initial weights, on the same stream: ``M`` as the benchmark trains
it, and a twin ``M0`` on the stream with every canary replaced by a fresh general document (it
never saw them). Both have their sinks removed. Then, per component (embeddings and head, each
decoder layer's attention part and its MLP, all of one kind at once):

- ``restored``: ``M`` with that component's weights taken from ``M0``; the gap it loses is the
  memorization the component held;
- ``grafted``: ``M0`` with that component taken from ``M``; the gap it gains is what the
  component carries on its own.

Components are found from structure: the patched MLP sites name each decoder layer and its MLP;
everything else in a layer is its attention part (norms included); parameters outside every layer
are "embeddings and head". Each hybrid's validation loss is reported beside its gap: two models
trained apart do not fit together exactly, so a swap that raises it much is read with that in mind.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from hf_memsinks.mlp_discovery.resolve import mlp_sites
from hf_memsinks.model.add_sinks import get_memsink_model

from .config import BenchmarkConfig
from .metrics import doc_losses
from .setting import build_setting
from .training import build_model, make_accelerator, train

EMBEDDINGS = "embeddings and head"


def components(patched) -> dict[str, list[str]]:
    """Parameter-name prefixes per component of a patched model: ``L{i} attention``, ``L{i} MLP``,
    ``embeddings and head``, then ``all attention`` and ``all MLP``."""
    names = [n for n, _ in patched.named_parameters()]
    groups: dict[str, list[str]] = {}
    for site in mlp_sites(patched):
        mlp = site.name + "."
        layer = site.name.rsplit(".", 1)[0] + "." if site.spec and site.spec.mlp else mlp
        groups[f"L{site.layer} attention"] = sorted({n for n in names if n.startswith(layer) and not n.startswith(mlp)})
        groups[f"L{site.layer} MLP"] = [n for n in names if n.startswith(mlp)]
    inside = {n for g in groups.values() for n in g}
    groups[EMBEDDINGS] = [n for n in names if n not in inside]
    for kind in ("attention", "MLP"):
        layers = [g for k, g in groups.items() if k.startswith("L") and k.endswith(f" {kind}")]
        groups[f"all {kind}"] = [n for g in layers for n in g]
    return groups


def hybrid(into, source, names: list[str]):
    """A copy of ``into`` with the parameters ``names`` (and tied ones) copied from ``source``."""
    out = copy.deepcopy(into)
    params, src = dict(out.named_parameters()), dict(source.named_parameters())
    with torch.no_grad():
        for name in names:
            if name in params:
                params[name].copy_(src[name])
    return out


def gaps(model, setting, cfg: BenchmarkConfig) -> dict:
    def loss(docs):
        return doc_losses(model, docs, cfg, setting.pad_id).mean().item()

    return {"canary_gap": loss(setting.control_canaries) - loss(setting.canaries),
            "natural_gap": loss(setting.control_natural) - loss(setting.natural), "val_loss": loss(setting.validation)}


def attribute(cfg: BenchmarkConfig, out_dir: str | os.PathLike) -> dict:
    accelerator = make_accelerator(cfg)
    setting = build_setting(cfg)
    base = build_model(cfg, len(setting.tokenizer), setting.max_length).to(accelerator.device)
    config = cfg.memsink_config()
    trained = {}
    for name, stream in (("M", setting.stream), ("M0", setting.stream_without(setting.canaries))):
        model = get_memsink_model(copy.deepcopy(base), config)
        train(model, setting, stream, cfg, with_ids=True, label=f"memsinks {name}", accelerator=accelerator)
        trained[name] = model
    groups = components(trained["M"])
    m, m0 = (trained[k].remove_sinks() for k in ("M", "M0"))
    report = {"M": gaps(m, setting, cfg), "M0": gaps(m0, setting, cfg), "components": {},
              "memsink_config": config.to_dict(), "config": cfg.to_dict()}
    sizes = {n: p.numel() for n, p in m.named_parameters()}
    for name, names in groups.items():
        report["components"][name] = {"restored": gaps(hybrid(m, m0, names), setting, cfg),
                                      "grafted": gaps(hybrid(m0, m, names), setting, cfg),
                                      "parameters": sum(sizes.get(n, 0) for n in names)}
    if accelerator.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attribution.json").write_text(json.dumps(report, indent=2, default=float))
        (out / "attribution.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    gap, gap0 = report["M"]["canary_gap"], report["M0"]["canary_gap"]
    rows = ["| component | parameters | M, component from M0: canary gap (share of M's gap removed) | val loss |"
            " M0, component from M: canary gap (share of M's gap carried) | val loss |", "|---|---|---|---|---|---|"]
    for name, r in report["components"].items():
        restored, grafted = r["restored"], r["grafted"]
        rows.append(f"| {name} | {r['parameters']:,} | {restored['canary_gap']:.3f} "
                    f"({(gap - restored['canary_gap']) / gap:.2f}) | {restored['val_loss']:.3f} | "
                    f"{grafted['canary_gap']:.3f} ({(grafted['canary_gap'] - gap0) / gap:.2f}) | "
                    f"{grafted['val_loss']:.3f} |")
    head = (f"Sinks removed: M (trained with the canaries) keeps a canary gap of {gap:.3f} nats at val loss "
            f"{report['M']['val_loss']:.3f}; its twin M0 (canaries replaced by fresh documents) {gap0:.3f} at "
            f"{report['M0']['val_loss']:.3f}. MemSinkConfig: {json.dumps(report['memsink_config'])}.")
    return head + "\n\n" + "\n".join(rows) + "\n"
