"""What counting the sightings costs a training step under ``sinks_from_sighting``: one forward's
:func:`hf_memsinks.sightings.later_sinks.later_sighting_ids` (each row's ID and token-content hash
looked up and counted on the host) with a table of ``--seen`` documents already counted, the median
over ``--steps`` calls, per batch shape.

With ``--in-step SHAPE`` (a shape of ``finetune_cost.py``), the same in a training step: one
``for_finetuning(sink_optimizer="rowwise", sinks_from_sighting=2)`` model takes ``--steps`` pairs of
steps at batch 4 x 128 on rows already seen (so the same sinks are on either way), the counting
switched off (``sinks_from_sighting=1``) and on in turn; the median of each pair's ratio
(``--shapes`` and ``--seen`` do not apply).

usage: python benchmarks/sighting_count_cost.py [--seen 100000] [--steps 50] [--shapes 4x128,8x2048]
                                                [--in-step gpt2-124m]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # (finetune_cost, for --in-step)
from hf_memsinks import MemSinkConfig  # noqa: E402
from hf_memsinks.sightings.later_sinks import later_sighting_ids  # noqa: E402


def milliseconds(batch: int, seq: int, seen: int, steps: int, vocab: int = 32000) -> float:
    patch = types.SimpleNamespace(config=MemSinkConfig.for_finetuning(sinks_from_sighting=2), routing=None)
    g = torch.Generator().manual_seed(0)
    for start in range(0, seen, 5000):  # (the documents counted before: short rows, their hashes only)
        n = min(5000, seen - start)
        later_sighting_ids(patch, torch.randint(0, 2**40, (n,), generator=g), torch.randint(0, vocab, (n, 8),
                                                                                         generator=g), None)
    times = []
    for _ in range(steps):
        ids, x = torch.randint(0, 2**40, (batch,), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)
        t0 = time.perf_counter()
        later_sighting_ids(patch, ids, x, torch.ones_like(x))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def step_ratio(shape_name: str, pairs: int, batch: int = 4, seq: int = 128) -> dict:
    """Each pair of steps on one model, the counting off then on (the order swapped every pair):
    the median of (step with counting) / (step without)."""
    import dataclasses

    import finetune_cost

    shape = finetune_cost.SHAPES[shape_name]
    model, has_sinks = finetune_cost.prepare("for_finetuning+rowwise+later", shape, torch.float32, {})
    model.train()
    opt = finetune_cost._optimizer(model, has_sinks)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**40, (batch,), generator=g)
    tokens = torch.randint(0, shape["vocab"], (2 * pairs + 2, batch, seq), generator=g)
    counting = model.memsink.config
    configs = {True: counting, False: dataclasses.replace(counting, sinks_from_sighting=1)}
    for i in range(2):  # (the optimizer's state allocated, every ID seen twice: its sinks on either way)
        finetune_cost._timed_step(model, opt, tokens[i], ids, "cpu")
    if not bool((model.memsink.routing.sightings.count(ids) >= 2).all()):
        raise RuntimeError("the warm-up steps did not count every row twice: the timed steps would differ in sinks")
    ratios = []
    for k in range(pairs):
        seconds = {}
        for on in ((False, True) if k % 2 == 0 else (True, False)):
            model.memsink.config = configs[on]
            seconds[on] = finetune_cost._timed_step(model, opt, tokens[2 + 2 * k + on], ids, "cpu")
        ratios.append(seconds[True] / seconds[False])
    model.memsink.config = counting
    return {"shape": shape_name, "ratio": statistics.median(ratios), "ratios": ratios}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seen", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shapes", default="4x128,8x2048")
    parser.add_argument("--in-step", default=None, metavar="SHAPE",
                        help="a training step's ratio with and without counting, at this finetune_cost.py shape")
    args = parser.parse_args(argv)
    if args.in_step:
        result = step_ratio(args.in_step, args.steps)
        print(f"{args.in_step}: a step with the counting takes {result['ratio']:.4f}x one without "
              f"(median of {args.steps} pairs: {', '.join(f'{r:.3f}' for r in result['ratios'])})")
        return
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        print(f"batch {batch} x {seq}: {milliseconds(batch, seq, args.seen, args.steps):.2f} ms a step "
              f"({args.seen:,} documents counted before)")


if __name__ == "__main__":
    main()
