"""Side-by-side cost of sinks, in one process, interleaved, medians over repeated steps.

Variants (same total MLP width everywhere):
  vanilla      the unpatched model (the floor)
  vanilla_copy a second, identical unpatched model: its ratio is the measurement's noise floor
  memsinks     our patched model, split mode, per-sequence IDs (B,)
  memsinks_tok the same with per-token IDs (B, T)
  reference    the published approach as DESIGN.md describes it: per layer, a full-width float
               mask (B, T, I) from the reference hash over per-token IDs, multiplied into the MLP
               hidden activation (a forward pre-hook on the output projection; benchmark only)

Reports train step (forward + backward + AdamW) time and bytes saved for backward as ratios to
vanilla, eval forward (sinks dropped) against the remove_sinks() model, mask construction time
per step, remove_sinks() time and peak extra memory on a GPT-2-small shape, and torch.compile
against eager. Prints a table and writes bench.json.

usage: python benchmarks/bench.py [--reps N] [--sizes small,medium] [--shapes gpt2,llama,gpt_neox] [--out bench.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask  # noqa: E402
from hf_memsinks.architectures import find_mlp_sites, spec_for  # noqa: E402
from hf_memsinks.masks import reference_mask  # noqa: E402

SIZES = {
    "small": dict(layers=4, hidden=256, mlp=1024, batch=8, seq=256),
    "medium": dict(layers=6, hidden=512, mlp=2048, batch=8, seq=256),
}
VOCAB = 2048
MEMSINK = MemSinkConfig(sink_fraction=0.3, sink_active_prob=0.3)


def build(shape: str, size: dict, seed: int = 0):
    heads = size["hidden"] // 64
    if shape == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=size["hidden"], n_layer=size["layers"], n_head=heads,
                                      n_inner=size["mlp"], n_positions=size["seq"], vocab_size=VOCAB,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = AutoConfig.for_model(shape, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                                      num_attention_heads=heads, intermediate_size=size["mlp"],
                                      max_position_embeddings=size["seq"], vocab_size=VOCAB)
        if shape == "llama":
            config.num_key_value_heads = heads
        else:
            config.hidden_dropout = config.attention_dropout = 0.0
    config.use_cache = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def add_reference_hooks(model, per_token_ids: dict, general: int):
    """The published masking: per layer, per forward, a full-width float mask multiplied in."""
    sites = find_mlp_sites(model, spec_for(model.config.model_type))

    def hook(module, args):
        h = args[0]
        ids = per_token_ids["ids"]
        sinks = reference_mask(ids, h.shape[-1] - general, MEMSINK.sink_active_prob)
        mask = torch.cat([torch.ones(*ids.shape, general, dtype=h.dtype, device=h.device), sinks.to(h.dtype)], -1)
        return (h * mask,) + tuple(args[1:])

    for site in sites:
        site.out_proj.register_forward_pre_hook(hook)


def saved_bytes(model, batch) -> int:
    """Bytes of distinct tensors autograd saves for backward during one training forward."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(seen.values())


def median_times(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always goes first
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def train_step_fn(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def eval_fn(model, batch):
    def run():
        model.eval()
        with torch.no_grad():
            model(input_ids=batch["input_ids"])
    return run


def bench_one(shape: str, size_name: str, reps: int) -> dict:
    size = SIZES[size_name]
    b, t = size["batch"], size["seq"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (b, t), generator=g)
    seq_ids = torch.randint(1, 2**62, (b,), generator=g)
    tok_ids = torch.randint(1, 2**62, (b, 4), generator=g).repeat_interleave(t // 4, dim=1)  # 4 documents per row

    vanilla = build(shape, size)
    patched = get_memsink_model(build(shape, size), MEMSINK)
    reference = build(shape, size)
    general, sinks = MEMSINK.num_sinks_for(size["mlp"])
    holder = {"ids": tok_ids}
    add_reference_hooks(reference, holder, general)
    removed = copy.deepcopy(patched).remove_sinks()

    plain_batch = {"input_ids": tokens, "labels": tokens}
    seq_batch = {**plain_batch, "sequence_ids": seq_ids}
    tok_batch = {**plain_batch, "sequence_ids": tok_ids}

    steps = median_times({
        "vanilla": train_step_fn(vanilla, plain_batch),
        "vanilla_copy": train_step_fn(build(shape, size), plain_batch),
        "memsinks": train_step_fn(patched, seq_batch),
        "memsinks_tok": train_step_fn(copy.deepcopy(patched), tok_batch),
        "reference": train_step_fn(reference, plain_batch),
    }, reps)
    memory = {
        "vanilla": saved_bytes(vanilla, plain_batch),
        "memsinks": saved_bytes(patched, seq_batch),
        "memsinks_tok": saved_bytes(patched, tok_batch),
        "reference": saved_bytes(reference, plain_batch),
    }
    evals = median_times({"removed": eval_fn(removed, plain_batch), "memsinks_drop": eval_fn(patched, plain_batch)},
                         reps * 2)

    def mask_time(ids, per_layer_ref=False, n=20):
        t0 = time.perf_counter()
        for _ in range(n):
            if per_layer_ref:
                for _ in range(size["layers"]):
                    m = reference_mask(ids, sinks, MEMSINK.sink_active_prob)
                    torch.cat([torch.ones(*ids.shape, general), m.float()], -1)
            else:
                sink_mask(ids, sinks, MEMSINK.sink_active_prob)
        return (time.perf_counter() - t0) / n

    out = {
        "shape": shape, "size": size_name, **size, "general": general, "sinks": sinks,
        "step_s": steps, "step_ratio": {k: v / steps["vanilla"] for k, v in steps.items()},
        "saved_bytes": memory, "saved_bytes_ratio": {k: v / memory["vanilla"] for k, v in memory.items()},
        "eval_s": evals, "eval_ratio_drop_to_removed": evals["memsinks_drop"] / evals["removed"],
        "mask_ms_per_step": {"memsinks": 1e3 * mask_time(seq_ids), "memsinks_tok": 1e3 * mask_time(tok_ids),
                             "reference": 1e3 * mask_time(tok_ids, per_layer_ref=True)},
    }
    del vanilla, patched, reference, removed
    gc.collect()
    return out


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def bench_remove_sinks() -> dict:
    """remove_sinks() on a GPT-2-small shape (12 x 768, MLP 3072): time and peak extra memory
    (peak RSS during the call minus RSS before it; Linux resets the peak via clear_refs)."""
    config = AutoConfig.for_model("gpt2", n_embd=768, n_layer=12, n_head=12, n_inner=3072)
    torch.manual_seed(0)
    model = get_memsink_model(AutoModelForCausalLM.from_config(config), MEMSINK)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS")
    except OSError:
        before = None
    t0 = time.perf_counter()
    model.remove_sinks()
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") if before is not None else None
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "peak_extra_mib": None if peak is None else (peak - before) / 1024,
            "parameters_after": params, "model_mib": params * 4 / 2**20}


def bench_compile(reps: int) -> dict:
    """torch.compile of the patched model against eager, small gpt2 shape, train steps."""
    size = SIZES["small"]
    b, t = size["batch"], size["seq"]
    tokens = torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens, "labels": tokens, "sequence_ids": torch.arange(1, b + 1)}
    eager = get_memsink_model(build("gpt2", size), MEMSINK)
    compiled_model = get_memsink_model(build("gpt2", size), MEMSINK)
    compiled = torch.compile(compiled_model)
    t0 = time.perf_counter()
    train_step_fn(compiled, batch)()  # compile
    compile_s = time.perf_counter() - t0
    steps = median_times({"eager": train_step_fn(eager, batch), "compiled": train_step_fn(compiled, batch)}, reps)
    return {"compile_s": compile_s, "step_s": steps, "compiled_to_eager": steps["compiled"] / steps["eager"]}


def _in_subprocess(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter: no allocator or thread-pool state carries over
    from the previous model sizes (variants within one measurement still share one process)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, *args, "--part-out", f.name], check=True)
        return json.loads(Path(f.name).read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--shapes", default="gpt2,llama,gpt_neox")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.part:
        kind, *rest = args.part.split(":")
        if kind == "one":
            result = bench_one(rest[0], rest[1], args.reps)
        elif kind == "remove":
            result = bench_remove_sinks()
        else:
            result = bench_compile(args.reps)
        Path(args.part_out).write_text(json.dumps(result))
        return
    start = time.time()
    rows = []
    for size in args.sizes.split(","):
        for shape in args.shapes.split(","):
            print(f"benchmarking {shape} {size} ...", flush=True)
            rows.append(_in_subprocess(["--part", f"one:{shape}:{size}", "--reps", str(args.reps)]))
            Path(args.out).write_text(json.dumps({"rows": rows, "partial": True}, indent=2))
    removal = _in_subprocess(["--part", "remove"])
    compiled = None if args.no_compile else _in_subprocess(["--part", "compile", "--reps", str(args.reps)])
    result = {
        "rows": rows, "remove_sinks_gpt2_small": removal, "compile": compiled,
        "reps": args.reps, "seconds": time.time() - start,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "threads": torch.get_num_threads(),
                     "machine": platform.machine()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


def table(result: dict) -> str:
    lines = ["| shape | size | step vanilla copy (noise) | step memsinks (B,) | step memsinks (B,T) | step reference | "
             "saved bytes (B,) | saved bytes (B,T) | saved bytes reference | eval drop / removed | "
             "mask ms (B,) / (B,T) / reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s, m, k = r["step_ratio"], r["saved_bytes_ratio"], r["mask_ms_per_step"]
        lines.append(f"| {r['shape']} | {r['size']} | {s['vanilla_copy']:.3f} | {s['memsinks']:.3f} | {s['memsinks_tok']:.3f} | "
                     f"{s['reference']:.3f} | {m['memsinks']:.4f} | {m['memsinks_tok']:.4f} | {m['reference']:.4f} | "
                     f"{r['eval_ratio_drop_to_removed']:.3f} | {k['memsinks']:.2f} / {k['memsinks_tok']:.2f} / "
                     f"{k['reference']:.2f} |")
    rm = result["remove_sinks_gpt2_small"]
    peak = "n/a" if rm["peak_extra_mib"] is None else f"{rm['peak_extra_mib']:.0f} MiB"
    lines.append(f"\nremove_sinks() on GPT-2-small shape: {rm['seconds']:.3f} s, peak extra memory {peak} "
                 f"(model {rm['model_mib']:.0f} MiB)")
    if result.get("compile"):
        c = result["compile"]
        lines.append(f"torch.compile train step / eager: {c['compiled_to_eager']:.3f} (compile {c['compile_s']:.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
