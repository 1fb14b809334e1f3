"""What the fine-tuning recipes cost at a real model's shape: parameters, trainable parameters, step
time and peak training memory, against the full fine-tune and against LoRA r16.

Each variant trains in its own process (peak memory is per process): the model is built from a
config (random weights: the cost does not depend on them), patched, and takes ``--steps`` AdamW
steps (gradients clipped to norm 1 first, as ``Trainer`` does) after one warm-up step (which
allocates the optimizer state) on random tokens, one sequence ID per row, AdamW with ``fused=True``
(what ``Trainer``'s default ``adamw_torch_fused`` builds, on a CPU too). Step: the median of the
timed steps. Memory: on CPU the process's peak resident set minus its resident set before the
model was built (``VmHWM - VmRSS``: weights, gradients, optimizer state, activations, allocator
slack); on CUDA ``max_memory_allocated``. Every variant
runs ``--rounds`` times, the order reversed each round (this host's speed drifts), and the ratios
use the medians over rounds. Then, with ``--paired-rounds N`` (not in ``make bench``), every variant of a
shape trains side by side in one process, and each round's step is divided by the same round's
step of its reference (``measure_paired``): the step ratio this host's drift moves least. A 7B
shape is computed by arithmetic (``arithmetic``), as are 1B. With ``--keep-freed-memory`` the measuring
processes run with glibc keeping the memory a step frees (:data:`KEEP_FREED`), as a GPU's caching
allocator does: by default it returns large blocks to the system, and each step's gradients fault
their pages in again, a cost that grows with the parameters and so with the sinks. With
``--return-freed-memory`` (:data:`RETURN_FREED`) it returns every block of 1 MiB or more, so the peak
resident set is close to the peak of live tensors, which is what a GPU's ``max_memory_allocated`` reports.

usage: python benchmarks/finetune_cost.py [--shapes gpt2-124m,llama-160m] [--device cpu|cuda]
                                          [--dtype fp32|bf16] [--out benchmarks/finetune_cost.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model, train_sinks  # noqa: E402

# Shapes measured: GPT-2 small, and a Llama of the same depth class (GQA, SwiGLU, untied head).
SHAPES = {
    "gpt2-124m": dict(type="gpt2", layers=12, hidden=768, heads=12, kv_heads=12, mlp=3072, vocab=50257),
    "llama-160m": dict(type="llama", layers=8, hidden=1024, heads=16, kv_heads=4, mlp=2816, vocab=32000),
    "tiny": dict(type="llama", layers=2, hidden=64, heads=4, kv_heads=2, mlp=176, vocab=512),  # the script's test
    # GPU only (--device cuda): Llama-3.2-1B's shape
    "llama-1b": dict(type="llama", layers=16, hidden=2048, heads=32, kv_heads=8, mlp=8192, vocab=128256, tied=True),
}
# Shapes computed: Llama-3.2-1B and Llama-2-7B.
ARITHMETIC_SHAPES = {
    "llama-3.2-1b": dict(type="llama", layers=16, hidden=2048, heads=32, kv_heads=8, mlp=8192, vocab=128256,
                         tied=True),
    "llama-2-7b": dict(type="llama", layers=32, hidden=4096, heads=32, kv_heads=32, mlp=11008, vocab=32000),
}
LORA_R = 16

# for_finetuning(**FIRST_LAYER): sinks in the first decoder layer only, twice its width (docs/finetune.md)
FIRST_LAYER = {"layers": [0], "sink_fraction": 2 / 3}
# name -> (MemSinkConfig overrides on for_finetuning(), or None for no sinks; LoRA on the general path)
VARIANTS = {
    "full": (None, False),
    "lora_r16": (None, True),
    "for_finetuning": ({}, False),
    "for_finetuning+lora_r16": ({}, True),
    "first_layer": (FIRST_LAYER, False),
    "first_layer+lora_r16": (FIRST_LAYER, True),
    # the sinks stored apart and stepped by sink_optimizer="rowwise": no AdamW state for them
    "for_finetuning+rowwise": ({"sink_optimizer": "rowwise"}, False),
    "for_finetuning+rowwise+lora_r16": ({"sink_optimizer": "rowwise"}, True),
    # the same, each document's sinks on from its second sighting (every timed row is one: _step_ids)
    "for_finetuning+rowwise+later": ({"sink_optimizer": "rowwise", "sinks_from_sighting": 2}, False),
    "for_finetuning+rowwise+later+lora_r16": ({"sink_optimizer": "rowwise", "sinks_from_sighting": 2}, True),
    # a bound, not a recipe: the same with each sink part's gradient freed as soon as backward makes it (so
    # the sinks do not train): what gradients of the touched rows only could save at most
    "for_finetuning+rowwise+lora_r16+no_sink_grads": ({"sink_optimizer": "rowwise"}, True),
}
# run when named in --variants (docs/performance.md has their own command), not in make bench's table
ON_REQUEST = ("first_layer", "first_layer+lora_r16", "for_finetuning+rowwise+lora_r16+no_sink_grads",
              "for_finetuning+rowwise+later", "for_finetuning+rowwise+later+lora_r16")


def build(shape: dict, dtype: torch.dtype, device: str = "cpu"):
    if shape["type"] == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=shape["hidden"], n_layer=shape["layers"], n_head=shape["heads"],
                                      n_inner=shape["mlp"], vocab_size=shape["vocab"], n_positions=1024,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = AutoConfig.for_model("llama", hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                                      intermediate_size=shape["mlp"], vocab_size=shape["vocab"],
                                      tie_word_embeddings=shape.get("tied", False))
    torch.manual_seed(0)
    with torch.device(device):  # (initialised where it trains: a 1B model's init on CPU takes long)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def lora_targets(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    return sorted(names - {"lm_head"})


def prepare(variant: str, shape: dict, dtype: torch.dtype, overrides: dict, device: str = "cpu"):
    """The model of one variant; a name outside VARIANTS is an extra ``--recipe`` (``NAME+lora_r16``:
    with LoRA)."""
    if variant not in VARIANTS and variant not in overrides:
        raise ValueError(f"unknown variant {variant!r}: one of {sorted(VARIANTS)} or a --recipe name")
    sinks, lora = VARIANTS[variant] if variant in VARIANTS else (overrides[variant], variant.endswith("+lora_r16"))
    model = build(shape, dtype, device)
    if sinks is not None:
        model = get_memsink_model(model, MemSinkConfig.for_finetuning(**{"mode": "add", **sinks}))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=lora_targets(model),
                                                 lora_dropout=0.0))
        if sinks is not None:
            train_sinks(model)
    if variant.endswith("+no_sink_grads"):
        for name, param in model.named_parameters():
            if ".sink_part_" in name:
                param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    return model, sinks is not None


def _step_ids(model, has_sinks: bool, ids: torch.Tensor) -> torch.Tensor | None:
    """Each step's sequence IDs (None without sinks). Under ``sinks_from_sighting=2`` every step
    carries the warm-up step's IDs, so every timed row is a later sighting with its sinks on (fresh
    IDs would switch none on) and the step pays for counting the sightings too."""
    if not has_sinks:
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ids[:1].expand_as(ids) if inner.memsink.config.sinks_from_sighting > 1 else ids


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _optimizer(model, has_sinks: bool) -> torch.optim.Optimizer:
    """AdamW as Trainer's default ``adamw_torch_fused`` builds it, with the sinks' hook."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0,
                            fused=True)
    if has_sinks:
        attach_sink_lr(model, opt)
    return opt


def _timed_step(model, opt, tokens: torch.Tensor, ids: torch.Tensor | None, device: str) -> float:
    """Seconds of one training step (forward, backward, gradients clipped to norm 1 as ``Trainer``'s
    default ``max_grad_norm`` does, optimizer step, gradients freed)."""
    x = tokens.to(device)
    kwargs = {"sequence_ids": ids.to(device)} if ids is not None else {}
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(input_ids=x, labels=x, **kwargs).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(variant: str, shape_name: str, device: str, dtype: torch.dtype, steps: int, batch: int, seq: int,
            overrides: dict) -> dict:
    """One variant in this process: parameters, the median step and the peak training memory."""
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab"], (steps + 1, batch, seq), generator=g)
    ids = torch.randint(0, 2**40, (steps + 1, batch), generator=g)
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
        base = _rss_kb("VmRSS") * 1024
    model, has_sinks = prepare(variant, shape, dtype, overrides, device)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(model, has_sinks)
    ids = _step_ids(model, has_sinks, ids)
    times = [_timed_step(model, opt, tokens[i], ids[i] if has_sinks else None, device) for i in range(steps + 1)]
    times = times[1:]  # (the first step allocates the optimizer state)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024
    return {"variant": variant, "shape": shape_name, "parameters": params,
            "trainable": sum(p.numel() for p in trainable), "step_s": statistics.median(times),
            "peak_bytes": peak - base,
            "allocator": {k: os.environ[k] for k in {**KEEP_FREED, **RETURN_FREED} if k in os.environ}}


def measure_paired(shape_name: str, variants: list[str], device: str, dtype: torch.dtype, rounds: int, batch: int,
                   seq: int, overrides: dict) -> dict:
    """Every variant in this one process, a training step each per round, in an order rotated every
    round; each round's step of a variant over the same round's step of its reference (``full``;
    ``lora_r16`` for a ``+lora_r16`` variant), median over rounds. Drift of the host over seconds moves
    a variant and its reference alike, so the ratio is steadier than one of separate processes'
    medians; memory is not measured here (the models live side by side). Round 0 allocates the
    optimizer state and is not counted."""
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab"], (rounds + 1, batch, seq), generator=g)
    ids = torch.randint(0, 2**40, (rounds + 1, batch), generator=g)
    models = {}
    for variant in variants:
        model, has_sinks = prepare(variant, shape, dtype, overrides, device)
        model.to(device).train()
        models[variant] = (model, _optimizer(model, has_sinks), has_sinks, _step_ids(model, has_sinks, ids))
    times = {v: [] for v in variants}
    for i in range(rounds + 1):
        shift = i % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            model, opt, has_sinks, step_ids = models[variant]
            seconds = _timed_step(model, opt, tokens[i], step_ids[i] if has_sinks else None, device)
            if i > 0:
                times[variant].append(seconds)
    ratios = {}
    for variant in variants:
        ref = "lora_r16" if variant.endswith("lora_r16") else "full"
        if ref in times and variant != ref:
            per_round = [a / b for a, b in zip(times[variant], times[ref])]
            ratios[variant] = {"reference": ref, "ratio": statistics.median(per_round), "per_round": per_round}
    return {"shape": shape_name, "step_s_all": times, "vs_reference": ratios}


def measure_sink_step(shape_name: str, device: str, dtype: torch.dtype, batch: int, seq: int,
                      repeats: int = 8) -> dict:
    """The optimizer step of ``for_finetuning()`` with its sink-LR hook two ways, alternating on one
    model and one set of gradients: torch's AdamW (the hook scales the sinks' step in place from
    AdamW's state) and a subclass of it (the hook saves a copy of every sink before the step and
    moves the sinks to ``old + 7 * (new - old)`` after it, as for any other optimizer)."""
    shape = SHAPES[shape_name]
    model, _ = prepare("for_finetuning", shape, dtype, {}, device)
    model.to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, shape["vocab"], (batch, seq), generator=g).to(device)
    model(input_ids=x, labels=x, sequence_ids=torch.randint(0, 2**40, (batch,), generator=g).to(device)).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    opts = {"in_place": torch.optim.AdamW(params, lr=1e-5, fused=True),
            "copy": type("AdamWSubclass", (torch.optim.AdamW,), {})(params, lr=1e-5, fused=True)}
    hooks = {name: attach_sink_lr(model, opt) for name, opt in opts.items()}
    times = {name: [] for name in opts}
    for i in range(repeats + 1):
        for name in list(opts) if i % 2 == 0 else list(opts)[::-1]:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opts[name].step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # (the first step allocates the optimizer state)
                times[name].append(time.perf_counter() - t0)
    step = {name: statistics.median(t) for name, t in times.items()}
    copied = sum(param.narrow(dim, start, n).numel() * param.element_size()
                 for param, dim, start, n in hooks["copy"].targets)
    return {"shape": shape_name, "step_s": step, "steps_s_all": times,
            "in_place_vs_copy": step["in_place"] / step["copy"], "copy_gib": copied / 2**30}


# ---- arithmetic ------------------------------------------------------------------------------------


def shape_params(shape: dict) -> dict:
    """Parameter counts of a Llama shape: all, MLP, LoRA r16 on every linear layer, and one sink
    neuron in one layer (``per_sink``)."""
    h, f, L, v = shape["hidden"], shape["mlp"], shape["layers"], shape["vocab"]
    kv = h * shape["kv_heads"] // shape["heads"]
    attn = 2 * h * h + 2 * h * kv
    mlp = 3 * h * f
    embed = v * h * (1 if shape.get("tied") else 2)
    total = L * (attn + mlp + 2 * h) + embed + h
    lora = L * LORA_R * ((h + h) * 2 + (h + kv) * 2 + 2 * (h + f) + (f + h))
    return {"total": total, "mlp": L * mlp, "lora": lora, "per_sink": 3 * h}


# the share of the sinks a step touches: a micro-batch of 4 documents, each activating 5% of them
TOUCHED = 1 - (1 - 0.05) ** 4


def arithmetic(shape: dict, sinks_per_layer: int, layers: int | None = None) -> dict:
    """Parameters and the bytes of weights, gradients and AdamW state (activations excluded) of
    each variant, for ``sinks_per_layer`` added sinks in ``layers`` layers (None: every layer).
    Full fine-tune: bf16 weights and gradients,
    fp32 master weights and two fp32 moments (16 bytes a parameter); LoRA: the frozen base in bf16
    (2 bytes), adapters at 16; sinks under LoRA, stored apart from the frozen weight: 16; under
    ``sink_optimizer="rowwise"`` (``sinks+rowwise``, ``sinks+lora_r16+rowwise``) no moments for the
    sinks, and a gradient for the rows a step touched only (:data:`TOUCHED` of them:
    ``hf_memsinks/layers/touched_rows.py``): under LoRA the weight and that gradient in fp32, in a
    full fine-tune a bf16 weight, an fp32 master weight and that gradient in bf16."""
    p = shape_params(shape)
    sinks = sinks_per_layer * p["per_sink"] * (shape["layers"] if layers is None else layers)
    rows = {
        "full": (p["total"], p["total"], 16 * p["total"]),
        "lora_r16": (p["total"] + p["lora"], p["lora"], 2 * p["total"] + 16 * p["lora"]),
        "sinks": (p["total"] + sinks, p["total"] + sinks, 16 * (p["total"] + sinks)),
        "sinks+rowwise": (p["total"] + sinks, p["total"] + sinks, 16 * p["total"] + (6 + 2 * TOUCHED) * sinks),
        "sinks+lora_r16": (p["total"] + sinks + p["lora"], p["lora"] + sinks,
                           2 * p["total"] + 16 * (p["lora"] + sinks)),
        "sinks+lora_r16+rowwise": (p["total"] + sinks + p["lora"], p["lora"] + sinks,
                                   2 * p["total"] + 16 * p["lora"] + (4 + 4 * TOUCHED) * sinks),
    }
    return {name: {"parameters": n, "trainable": t, "state_gib": b / 2**30} for name, (n, t, b) in rows.items()}


# ---- driver ----------------------------------------------------------------------------------------


# --keep-freed-memory: glibc keeps freed blocks of up to 32 MiB in its heap (and never trims it), so a
# step's gradients reuse the pages of the step before, as a GPU's caching allocator reuses its blocks,
# instead of being returned to the system and faulted in again at their first write.
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
              "MALLOC_TOP_PAD_": str(1 << 30)}
# --return-freed-memory: every block of 1 MiB or more is a mapping of its own, returned to the system when
# freed (glibc's default raises that threshold as blocks are freed, up to 32 MiB, and then keeps them in
# its heap, where the holes left between blocks still in use stay resident), so the peak resident set is
# close to the peak of the tensors alive at once: what a GPU's max_memory_allocated reports.
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _in_subprocess(args: list[str], env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, *args, "--part-out", f.name], check=True,
                       env=None if env is None else {**os.environ, **env})
        return json.loads(Path(f.name).read_text())


def summarize(runs: list[dict]) -> list[dict]:
    """Median step and memory per (shape, variant) over rounds, with ratios to full and LoRA r16."""
    rows = []
    for shape in dict.fromkeys(r["shape"] for r in runs):
        mine = [r for r in runs if r["shape"] == shape]
        med = {}
        for variant in dict.fromkeys(r["variant"] for r in mine):
            these = [r for r in mine if r["variant"] == variant]
            med[variant] = {"parameters": these[0]["parameters"], "trainable": these[0]["trainable"],
                            "step_s": statistics.median(r["step_s"] for r in these),
                            "peak_gib": statistics.median(r["peak_bytes"] for r in these) / 2**30,
                            "steps_s_all": [round(r["step_s"], 3) for r in these]}
        for variant, m in med.items():
            row = {"shape": shape, "variant": variant, **m}
            for ref in ("full", "lora_r16"):
                if ref in med:
                    row[f"step_vs_{ref}"] = m["step_s"] / med[ref]["step_s"]
                    row[f"memory_vs_{ref}"] = m["peak_gib"] / med[ref]["peak_gib"]
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | variant | parameters | trainable | step s | step / full | step / LoRA | peak GiB | "
             "memory / full | memory / LoRA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['variant']} | {r['parameters'] / 1e6:.1f}M | {r['trainable'] / 1e6:.1f}M | "
                     f"{r['step_s']:.3f} | {r.get('step_vs_full', float('nan')):.2f} | "
                     f"{r.get('step_vs_lora_r16', float('nan')):.2f} | {r['peak_gib']:.2f} | "
                     f"{r.get('memory_vs_full', float('nan')):.2f} | {r.get('memory_vs_lora_r16', float('nan')):.2f} |")
    return "\n".join(lines)


# recipe -> (sinks per patched MLP as a multiple of its width, patched layers: None = all)
RECIPES = {"none": (0.0, None), "for_finetuning": (1.0, None), "first_layer": (2.0, 1)}


def arithmetic_table(recipes: dict[str, tuple[float, int | None]] = RECIPES) -> tuple[str, dict]:
    out, lines = {}, ["| shape | recipe (sinks per MLP) | variant | parameters | trainable | weights + grads + AdamW "
                      "GiB | / full | / LoRA |", "|---|---|---|---|---|---|---|---|"]
    for shape_name, shape in ARITHMETIC_SHAPES.items():
        for recipe, (frac, layers) in recipes.items():
            sinks = round(shape["mlp"] * frac)
            rows = arithmetic(shape, sinks, layers)
            out[f"{shape_name}/{recipe}"] = {"sinks_per_layer": sinks, **rows}
            full, lora = rows["full"]["state_gib"], rows["lora_r16"]["state_gib"]
            names = ("sinks", "sinks+rowwise", "sinks+lora_r16", "sinks+lora_r16+rowwise")
            for name in names if recipe != "none" else ("full", "lora_r16"):
                r = rows[name]
                lines.append(f"| {shape_name} | {recipe} ({sinks}) | {name} | {r['parameters'] / 1e9:.2f}B | "
                             f"{r['trainable'] / 1e9:.3f}B | {r['state_gib']:.1f} | {r['state_gib'] / full:.2f} | "
                             f"{r['state_gib'] / lora:.2f} |")
    return "\n".join(lines), out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="gpt2-124m,llama-160m")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in ON_REQUEST))
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=JSON",
                        help="an extra variant: NAME=JSON overrides of for_finetuning() (NAME+lora: with LoRA r16)")
    parser.add_argument("--recipe-without-lora", action="store_true",
                        help="run the --recipe variants without their NAME+lora_r16 companions")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paired-rounds", type=int, default=0,
                        help="also N rounds of every variant side by side in one process per shape (0: not run)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run the measuring processes with glibc keeping freed memory (KEEP_FREED)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="run the measuring processes with glibc returning every freed block of 1 MiB or more "
                             "(RETURN_FREED): peak memory close to the peak of live tensors")
    parser.add_argument("--out", default="benchmarks/finetune_cost.json")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    overrides = {}
    for spec in args.recipe:
        name, _, raw = spec.partition("=")
        overrides[name] = overrides[name + "+lora_r16"] = json.loads(raw)
    if args.part:
        shape, variant = args.part.split(":", 1)
        if variant == "sink_step":
            result = measure_sink_step(shape, args.device, dtype, args.batch, args.seq)
        elif variant.startswith("paired="):
            result = measure_paired(shape, variant.removeprefix("paired=").split(","), args.device, dtype,
                                    args.paired_rounds, args.batch, args.seq, overrides)
        else:
            result = measure(variant, shape, args.device, dtype, args.steps, args.batch, args.seq, overrides)
        Path(args.part_out).write_text(json.dumps(result))
        return
    variants = args.variants.split(",")
    variants += [name for name in overrides if name not in variants
                 and not (args.recipe_without_lora and name.endswith("+lora_r16"))]
    start, runs, sink_steps = time.time(), [], []
    if args.keep_freed_memory and args.return_freed_memory:
        parser.error("--keep-freed-memory and --return-freed-memory set glibc two opposite ways: pick one")
    env = KEEP_FREED if args.keep_freed_memory else RETURN_FREED if args.return_freed_memory else None
    common = ["--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
              "--steps", str(args.steps)] + [x for spec in args.recipe for x in ("--recipe", spec)]
    for shape in args.shapes.split(","):
        for k in range(args.rounds):
            for variant in variants if k % 2 == 0 else variants[::-1]:
                print(f"{shape} {variant} (round {k + 1}) ...", flush=True)
                runs.append(_in_subprocess(["--part", f"{shape}:{variant}", *common], env))
        if "for_finetuning" in variants:
            print(f"{shape} the sink-LR hook's step ...", flush=True)
            sink_steps.append(_in_subprocess(["--part", f"{shape}:sink_step", *common], env))
    paired = []
    for shape in args.shapes.split(",") if args.paired_rounds > 0 else []:
        print(f"{shape} every variant side by side, {args.paired_rounds} rounds ...", flush=True)
        paired.append(_in_subprocess(["--part", f"{shape}:paired={','.join(variants)}", *common,
                                      "--paired-rounds", str(args.paired_rounds)], env))
    rows = summarize(runs)
    computed_table, computed = arithmetic_table()
    result = {"rows": rows, "runs": runs, "sink_step": sink_steps, "paired": paired, "arithmetic": computed,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "rounds": args.rounds,
              "seconds": time.time() - start,
              "versions": {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.machine(),
                           "dtype": args.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
                           "threads": torch.get_num_threads(), "allocator": env or "default"}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(rows))
    print()
    for r in sink_steps:
        print(f"{r['shape']}: for_finetuning's optimizer step, sinks scaled in place {r['step_s']['in_place']:.3f} s, "
              f"with a saved copy {r['step_s']['copy']:.3f} s ({r['in_place_vs_copy']:.2f}x; the copy holds "
              f"{r['copy_gib']:.2f} GiB)")
    for r in paired:
        print(f"{r['shape']}, side by side in one process: " + ", ".join(
            f"{v} {q['ratio']:.3f}x {q['reference']}" for v, q in r["vs_reference"].items()))
    print()
    print(computed_table)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
