"""What counting the sightings costs a training step under ``sinks_from_sighting``: one forward's
:func:`hf_memsinks.sightings.later_sinks.later_sighting_ids` (each row's ID and token-content hash
looked up and counted on the host) with a table of ``--seen`` documents already counted, the median
over ``--steps`` calls, per batch shape.

usage: python benchmarks/sighting_count_cost.py [--seen 100000] [--steps 50] [--shapes 4x128,8x2048]
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seen", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shapes", default="4x128,8x2048")
    args = parser.parse_args(argv)
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        print(f"batch {batch} x {seq}: {milliseconds(batch, seq, args.seen, args.steps):.2f} ms a step "
              f"({args.seen:,} documents counted before)")


if __name__ == "__main__":
    main()
