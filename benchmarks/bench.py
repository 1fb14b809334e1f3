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
vanilla, the in-step ratio (each step's time against the same step less the time spent in
hf_memsinks code, see InStepClock), eval forward (sinks dropped) against the remove_sinks()
model, mask construction time per step, and remove_sinks() time and peak extra memory on a
GPT-2-small shape. Prints a table and writes bench.json. With --compile: torch.compile of the
patched model against eager and against the compiled plain model instead.

Also the time get_memsink_model takes on a 124M GPT-2 (the first patch discovers the MLPs, a
second of the same kind reads the cache, a restored checkpoint reads its record), beside the time
of building that model with from_config. With --device cuda --dtype bf16 the same table on a GPU
(steps synchronised; sizes up to a 1B-parameter Llama shape).

usage: python benchmarks/bench.py [--reps N] [--sizes small,medium] [--shapes gpt2,llama,gpt_neox]
                                  [--device cpu|cuda] [--dtype fp32|bf16] [--compile] [--out bench.json]
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
from hf_memsinks.ids.masks import reference_mask  # noqa: E402
from hf_memsinks.integrations.optimizer import SinkLR, attach_sink_lr  # noqa: E402
from hf_memsinks.layers.mask_multiply import MaskSinks  # noqa: E402
from hf_memsinks.layers.projections import SinkInProjection, SinkOutProjection, is_patched_projection  # noqa: E402
from hf_memsinks.mlp_discovery.resolve import mlp_sites  # noqa: E402

SIZES = {
    "small": dict(layers=4, hidden=256, mlp=1024, batch=8, seq=256),
    "medium": dict(layers=6, hidden=512, mlp=2048, batch=8, seq=256),
    "tiny": dict(layers=2, hidden=64, mlp=256, batch=2, seq=32),  # for the script's own test
    "124m": dict(layers=12, hidden=768, mlp=3072, batch=8, seq=512),  # GPT-2 small's shape
    "1b": dict(layers=16, hidden=2048, mlp=8192, batch=4, seq=1024),  # Llama-3.2-1B's shape
}
DEFAULT_SIZES = {"cpu": "small,medium", "cuda": "small,medium,124m,1b"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE, DTYPE = torch.device("cpu"), torch.float32  # set by main (--device, --dtype)


def sync() -> None:
    """Wait for the device: a step's time must include its kernels, not only their launch."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
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
    return AutoModelForCausalLM.from_config(config, dtype=DTYPE).to(DEVICE)


def reference_full_mask(ids: torch.Tensor, general: int, sinks: int, like: torch.Tensor) -> torch.Tensor:
    """The published mask for one layer: float ``(*ids.shape, general + sinks)``, general part 1."""
    active = reference_mask(ids, sinks, MEMSINK.sink_active_prob)
    ones = torch.ones(*ids.shape, general, dtype=like.dtype, device=like.device)
    return torch.cat([ones, active.to(like.dtype)], -1)


def add_reference_hooks(model, per_token_ids: torch.Tensor, general: int):
    """The published masking: per layer, per forward, a full-width float mask multiplied in."""
    sites = mlp_sites(model)

    def hook(module, args):
        h = args[0]
        return (h * reference_full_mask(per_token_ids, general, h.shape[-1] - general, h),) + tuple(args[1:])

    for site in sites:
        site.out_proj.register_forward_pre_hook(hook)


class InStepClock:
    """Exclusive time spent in hf_memsinks code, measured inside the timed steps themselves.

    On this shared host, throughput drifts by +-20% over seconds (a fixed matmul repeated shows
    it, one thread or two), so two step timings taken seconds apart differ by more than the 1-2%
    in question. Our share of a step is measured within that step, so the drift cancels:
    ``step / (step - ours)`` is the ratio to the same step without our code. Ours = the patched
    model's forward wrapper (IDs, mask build), the patched projections' forwards minus the base
    layer forward they call (masking, dispatch), the masked backward and the sink learning rate's
    optimizer hook (``sink_lr_scale``, before and after each step). The wrappers cost well
    under a microsecond a call and wrap the base layers of every variant alike.
    """

    def __init__(self):
        self.ours = 0.0
        self.model_wrapper = 0.0  # the part of ``ours`` spent in the model-level forward wrapper
        self.sink_lr = 0.0  # the part of ``ours`` spent in the sink learning rate's optimizer hook
        self._children: list[float] = []  # per open frame: time spent in wrapped callees

    def wrap(self, fn, ours: bool, model_wrapper: bool = False, sink_lr: bool = False):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            self._children.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                inner = self._children.pop()
                if ours:
                    self.ours += elapsed - inner
                if model_wrapper:
                    self.model_wrapper += elapsed - inner
                if sink_lr:
                    self.sink_lr += elapsed - inner
                if self._children:
                    self._children[-1] += elapsed
        return timed

    def install(self, patched) -> None:
        """Wrap our code paths (class-wide, once) and the base classes they call into."""
        if getattr(InStepClock, "_installed", None) is not None:
            return
        InStepClock._installed = self
        record = patched.memsink  # the model's and the backbone's forward wrappers
        wrappers = [(patched, record.base_class)]
        if record.backbone_class is not None:
            wrappers.append((patched.base_model, record.backbone_class))
        for module, base_cls in wrappers:
            model_cls = type(module)
            model_cls.forward = self.wrap(model_cls.forward, ours=True, model_wrapper=True)
            base_cls.forward = self.wrap(base_cls.forward, ours=False)
        for cls in (SinkInProjection, SinkOutProjection):
            cls.forward = self.wrap(cls.forward, ours=True)
        MaskSinks.backward = staticmethod(self.wrap(MaskSinks.backward, ours=True))
        SinkLR.before = self.wrap(SinkLR.before, ours=True, sink_lr=True)
        SinkLR.after = self.wrap(SinkLR.after, ours=True, sink_lr=True)
        bases = {m.memsink.base_class for m in patched.modules() if is_patched_projection(m)}
        for cls in bases:
            cls.forward = self.wrap(cls.forward, ours=False)

    def measured(self, step, shares: list[float], attr: str = "ours", hook_shares: list[float] | None = None):
        """``step`` that appends (time in ``attr``) / (step time) of each call to ``shares``, and the
        sink learning rate hook's share to ``hook_shares``."""
        def run():
            self.ours = self.model_wrapper = self.sink_lr = 0.0
            t0 = time.perf_counter()
            step()
            elapsed = time.perf_counter() - t0
            shares.append(getattr(self, attr) / elapsed)
            if hook_shares is not None:
                hook_shares.append(self.sink_lr / elapsed)
        return run


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
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def paired_ratio(fn, baseline, pairs: int) -> float:
    """Median of fn-time / baseline-time over pairs run back to back in ABBA order: for calls
    of a fraction of a second the host's drift is the same for both halves of a pair."""
    fn(), baseline()
    ratios = []
    for i in range(pairs):
        times = {}
        for name, f in (("fn", fn), ("base", baseline)) if i % 2 == 0 else (("base", baseline), ("fn", fn)):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[name] = time.perf_counter() - t0
        ratios.append(times["fn"] / times["base"])
    return statistics.median(ratios)


def eval_mlp_fns(patched, removed, size: dict):
    """Layer 0's MLP of the patched model in eval (sinks dropped) and of the removed model, on
    one input: the only code that differs between the two models' eval forwards."""
    name = patched.memsink.sites[0].name
    x = torch.randn(size["batch"], size["seq"], size["hidden"], generator=torch.Generator().manual_seed(1))
    x = x.to(DEVICE, DTYPE)
    patched.eval()
    removed.eval()

    def call(mlp):
        def run():
            with torch.no_grad():
                mlp(x)
        return run
    return call(patched.get_submodule(name)), call(removed.get_submodule(name))


def train_step_fn(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    attach_sink_lr(model, opt)  # (the config's sink_lr_scale: its optimizer hook is part of the step)

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


def eval_measurements(clock, patched, removed, batch, size, reps) -> tuple[dict, float, float]:
    """Eval forwards: end-to-end medians of the removed model and the patched one with sinks dropped,
    their layer-0 MLP ratio in ABBA pairs, and the model wrapper's share of the patched forward."""
    wrapper_shares: list[float] = []
    drop = clock.measured(eval_fn(patched, batch), wrapper_shares, "model_wrapper")
    evals = median_times({"removed": eval_fn(removed, batch), "memsinks_drop": drop}, reps * 2)
    eval_mlp_ratio = paired_ratio(*eval_mlp_fns(patched, removed, size), pairs=8 * reps)
    return evals, eval_mlp_ratio, statistics.median(wrapper_shares[1:])


def mask_seconds(ids, layers: int, general: int, sinks: int, per_layer_ref: bool = False, n: int = 20) -> float:
    """Seconds to build one step's masks: ours once per forward, or the reference's full-width float
    mask once per layer."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        if per_layer_ref:
            for _ in range(layers):
                reference_full_mask(ids, general, sinks, like=torch.empty(0, device=DEVICE, dtype=DTYPE))
        else:
            sink_mask(ids, sinks, MEMSINK.sink_active_prob)
    sync()
    return (time.perf_counter() - t0) / n


def random_batch(size: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, one ID per row, and per-token IDs of 4 documents per row (seeded)."""
    b, t = size["batch"], size["seq"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (b, t), generator=g)
    seq_ids = torch.randint(1, 2**62, (b,), generator=g)
    tok_ids = torch.randint(1, 2**62, (b, 4), generator=g).repeat_interleave(t // 4, dim=1)
    return tokens.to(DEVICE), seq_ids.to(DEVICE), tok_ids.to(DEVICE)


def bench_one(shape: str, size_name: str, reps: int) -> dict:
    size = SIZES[size_name]
    tokens, seq_ids, tok_ids = random_batch(size)

    vanilla = build(shape, size)
    patched = get_memsink_model(build(shape, size), MEMSINK)
    reference = build(shape, size)
    general, sinks = MEMSINK.num_sinks_for(size["mlp"])
    add_reference_hooks(reference, tok_ids, general)
    removed = copy.deepcopy(patched).remove_sinks()

    plain_batch = {"input_ids": tokens, "labels": tokens}
    seq_batch = {**plain_batch, "sequence_ids": seq_ids}
    tok_batch = {**plain_batch, "sequence_ids": tok_ids}

    clock = InStepClock()
    clock.install(patched)
    shares = {"memsinks": [], "memsinks_tok": []}
    hook = {"memsinks": [], "memsinks_tok": []}
    steps = median_times({
        "vanilla": train_step_fn(vanilla, plain_batch),
        "vanilla_copy": train_step_fn(build(shape, size), plain_batch),
        "memsinks": clock.measured(train_step_fn(patched, seq_batch), shares["memsinks"], hook_shares=hook["memsinks"]),
        "memsinks_tok": clock.measured(train_step_fn(copy.deepcopy(patched), tok_batch), shares["memsinks_tok"],
                                       hook_shares=hook["memsinks_tok"]),
        "reference": train_step_fn(reference, plain_batch),
    }, reps)
    memory = {
        "vanilla": saved_bytes(vanilla, plain_batch),
        "memsinks": saved_bytes(patched, seq_batch),
        "memsinks_tok": saved_bytes(patched, tok_batch),
        "reference": saved_bytes(reference, plain_batch),
    }
    evals, eval_mlp_ratio, eval_wrapper_share = eval_measurements(clock, patched, removed, plain_batch, size, reps)

    def mask_time(ids, per_layer_ref=False):
        return mask_seconds(ids, size["layers"], general, sinks, per_layer_ref)

    in_step_share = {k: statistics.median(v[1:]) for k, v in shares.items()}  # v[0]: median_times' warmup
    # the same without the sink learning rate's optimizer hook: the masks' own cost
    mask_share = {k: statistics.median([s - h for s, h in zip(v[1:], hook[k][1:])]) for k, v in shares.items()}
    out = {
        "shape": shape, "size": size_name, **size, "general": general, "sinks": sinks,
        "step_s": steps, "step_ratio": {k: v / steps["vanilla"] for k, v in steps.items()},
        "in_step_share": in_step_share,
        "in_step_ratio": {k: 1 / (1 - v) for k, v in in_step_share.items()},
        "in_step_ratio_masks_only": {k: 1 / (1 - v) for k, v in mask_share.items()},
        "sink_lr_scale": MEMSINK.sink_lr_scale,
        "saved_bytes": memory, "saved_bytes_ratio": {k: v / memory["vanilla"] for k, v in memory.items()},
        "eval_s": evals, "eval_ratio_drop_to_removed": evals["memsinks_drop"] / evals["removed"],
        # The two eval forwards differ only in the MLPs and the model-level forward wrapper:
        "eval_mlp_ratio_drop_to_removed": eval_mlp_ratio,
        "eval_wrapper_share": eval_wrapper_share,
        "eval_ratio_bound": 1 + max(0.0, eval_mlp_ratio - 1) + eval_wrapper_share,
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


def bench_patch(tmp: str) -> dict:
    """get_memsink_model on a 124M GPT-2 (12 x 768, MLP 3072, vocab 50257), in a fresh process:
    the first patch of this kind discovers the MLPs (one check forward per candidate kind, cut at
    the site's layer), a second reads the per-kind cache, a named patch (``target_modules``)
    never discovers; restoring its checkpoint reads the recorded MLPs. Beside: ``from_config``
    and plain ``from_pretrained`` of the same model, measured in the same process."""
    from hf_memsinks import AutoMemSinkModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_embd=768, n_layer=12, n_head=12, n_inner=3072)
    named = MemSinkConfig(target_modules={"mlp": "mlp", "in_proj": ["c_fc"], "out_proj": "c_proj",
                                          "width_attr": "n_inner"})

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    torch.manual_seed(0)  # (each model its own config: patching sets the width field on it)
    models = [AutoModelForCausalLM.from_config(copy.deepcopy(config)) for _ in range(2)]
    _, from_config_s = timed(lambda: AutoModelForCausalLM.from_config(copy.deepcopy(config)))
    first, first_s = timed(lambda: get_memsink_model(models[0], MEMSINK))
    _, second_s = timed(lambda: get_memsink_model(models[1], MEMSINK))
    _, named_s = timed(lambda: get_memsink_model(AutoModelForCausalLM.from_config(copy.deepcopy(config)), named))
    named_s -= from_config_s  # that call built its model too
    first.save_pretrained(f"{tmp}/memsink")
    first.remove_sinks().save_pretrained(f"{tmp}/plain")
    _, plain_load_s = timed(lambda: AutoModelForCausalLM.from_pretrained(f"{tmp}/plain"))
    _, restore_s = timed(lambda: AutoMemSinkModelForCausalLM.from_pretrained(f"{tmp}/memsink"))
    return {"from_config_s": from_config_s, "first_patch_s": first_s, "second_patch_s": second_s,
            "named_patch_s_approx": named_s, "plain_from_pretrained_s": plain_load_s, "restore_s": restore_s}


def bench_compile(shape: str, reps: int) -> dict:
    """torch.compile (default inductor) of the patched model against the same model eager and
    against the compiled plain model, small size, per-sequence IDs, train steps, paired ratios."""
    size = SIZES["small"]
    b, t = size["batch"], size["seq"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (b, t), generator=g)
    plain_batch = {"input_ids": tokens, "labels": tokens}
    batch = {**plain_batch, "sequence_ids": torch.randint(1, 2**62, (b,), generator=g)}
    eager = get_memsink_model(build(shape, size), MEMSINK)
    compiled = torch.compile(get_memsink_model(build(shape, size), MEMSINK))
    compiled_vanilla = torch.compile(build(shape, size))
    fns = {"eager": train_step_fn(eager, batch), "compiled": train_step_fn(compiled, batch),
           "compiled_vanilla": train_step_fn(compiled_vanilla, plain_batch),
           "eager_vanilla": train_step_fn(build(shape, size), plain_batch)}
    compile_s = {}
    for name in ("compiled", "compiled_vanilla"):
        t0 = time.perf_counter()
        fns[name]()  # first call compiles
        compile_s[name] = time.perf_counter() - t0
    return {"shape": shape, "compile_s": compile_s, "pairs": 2 * reps,
            "compiled_to_eager": paired_ratio(fns["compiled"], fns["eager"], 2 * reps),
            "compiled_to_compiled_vanilla": paired_ratio(fns["compiled"], fns["compiled_vanilla"], 2 * reps),
            "vanilla_compiled_to_eager": paired_ratio(fns["compiled_vanilla"], fns["eager_vanilla"], 2 * reps)}


def _in_subprocess(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter: no allocator or thread-pool state carries over
    from the previous model sizes (variants within one measurement still share one process)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, *args, "--part-out", f.name], check=True)
        return json.loads(Path(f.name).read_text())


def _versions() -> dict:
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or platform.machine()
    return {"device": device, "dtype": str(DTYPE).removeprefix("torch."),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "machine": platform.machine()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--sizes", default=None, help="default: small,medium on cpu; up to 1b on cuda")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--shapes", default="gpt2,llama,gpt_neox")
    parser.add_argument("--compile", action="store_true",
                        help="instead of the main table: torch.compile against eager (small size, per shape)")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), DTYPES[args.dtype]
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here")
    args.sizes = args.sizes or DEFAULT_SIZES[args.device]
    where = ["--device", args.device, "--dtype", args.dtype]
    torch.manual_seed(0)
    if args.part:
        kind, *rest = args.part.split(":")
        if kind == "one":
            result = bench_one(rest[0], rest[1], args.reps)
        elif kind == "remove":
            result = bench_remove_sinks()
        elif kind == "patch":
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                result = bench_patch(tmp)
        else:
            result = bench_compile(rest[0], args.reps)
        Path(args.part_out).write_text(json.dumps(result))
        return
    start = time.time()
    if args.compile:
        rows = []
        for shape in args.shapes.split(","):
            print(f"compiling {shape} small ...", flush=True)
            rows.append(_in_subprocess(["--part", f"compile:{shape}", "--reps", str(args.reps)]))
        result = {"compile": rows, "reps": args.reps, "seconds": time.time() - start, "versions": _versions()}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(compile_table(result))
        print(f"wrote {args.out} ({result['seconds']:.0f} s)")
        return
    rows = []
    for size in args.sizes.split(","):
        for shape in args.shapes.split(","):
            print(f"benchmarking {shape} {size} ...", flush=True)
            rows.append(_in_subprocess(["--part", f"one:{shape}:{size}", "--reps", str(args.reps), *where]))
            Path(args.out).write_text(json.dumps({"rows": rows, "partial": True}, indent=2))
    removal = _in_subprocess(["--part", "remove"])
    patching = _in_subprocess(["--part", "patch"])
    result = {"rows": rows, "remove_sinks_gpt2_small": removal, "patch_gpt2_124m": patching, "reps": args.reps,
              "seconds": time.time() - start, "versions": _versions()}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


def compile_table(result: dict) -> str:
    lines = ["| shape | compiled / eager (memsinks) | compiled / eager (vanilla) | "
             "compiled memsinks / compiled vanilla | compile s (memsinks / vanilla) |",
             "|---|---|---|---|---|"]
    for r in result["compile"]:
        c = r["compile_s"]
        lines.append(f"| {r['shape']} | {r['compiled_to_eager']:.3f} | {r['vanilla_compiled_to_eager']:.3f} | "
                     f"{r['compiled_to_compiled_vanilla']:.3f} | {c['compiled']:.0f} / {c['compiled_vanilla']:.0f} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = ["Training step, ratio to vanilla (end to end: medians of interleaved steps; in-step: within the step)",
             "",
             "| shape | size | vanilla copy (noise) | memsinks (B,) | memsinks (B,T) | reference | in-step (B,) | "
             "in-step (B,T) | in-step without the sink-LR hook (B,) / (B,T) | saved bytes (B,) | saved bytes (B,T) | "
             "saved bytes reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s, m, i = r["step_ratio"], r["saved_bytes_ratio"], r["in_step_ratio"]
        q = r["in_step_ratio_masks_only"]
        lines.append(f"| {r['shape']} | {r['size']} | {s['vanilla_copy']:.3f} | {s['memsinks']:.3f} | "
                     f"{s['memsinks_tok']:.3f} | {s['reference']:.3f} | {i['memsinks']:.4f} | "
                     f"{i['memsinks_tok']:.4f} | {q['memsinks']:.4f} / {q['memsinks_tok']:.4f} | "
                     f"{m['memsinks']:.4f} | {m['memsinks_tok']:.4f} | {m['reference']:.4f} |")
    lines += ["", "Eval forward with sinks dropped, ratio to the remove_sinks() model; mask construction per step",
              "",
              "| shape | size | eval end to end | eval MLP (paired) | forward wrapper share | eval bound | "
              "mask ms (B,) / (B,T) / reference |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        k = r["mask_ms_per_step"]
        lines.append(f"| {r['shape']} | {r['size']} | {r['eval_ratio_drop_to_removed']:.3f} | "
                     f"{r['eval_mlp_ratio_drop_to_removed']:.3f} | {r['eval_wrapper_share']:.5f} | "
                     f"{r['eval_ratio_bound']:.3f} | {k['memsinks']:.2f} / {k['memsinks_tok']:.2f} / "
                     f"{k['reference']:.2f} |")
    rm = result["remove_sinks_gpt2_small"]
    peak = "n/a" if rm["peak_extra_mib"] is None else f"{rm['peak_extra_mib']:.0f} MiB"
    lines.append(f"\nremove_sinks() on GPT-2-small shape: {rm['seconds']:.3f} s, peak extra memory {peak} "
                 f"(model {rm['model_mib']:.0f} MiB)")
    if "patch_gpt2_124m" in result:
        p = result["patch_gpt2_124m"]
        lines.append(f"get_memsink_model on a 124M GPT-2: first {p['first_patch_s']:.3f} s, second of that kind "
                     f"{p['second_patch_s']:.4f} s, restore {p['restore_s']:.2f} s (plain from_pretrained "
                     f"{p['plain_from_pretrained_s']:.2f} s); from_config {p['from_config_s']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
