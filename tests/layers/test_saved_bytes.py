"""Bytes saved for backward (exact, counted with saved_tensors_hooks; no timing): the sink path
keeps at most a compact bool mask beyond what the plain model keeps, and the benchmark's
reference (full-width float mask per layer) keeps more."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench  # noqa: E402

SIZE = dict(layers=2, hidden=64, mlp=256, batch=4, seq=64)


@pytest.mark.parametrize("shape", ["gpt2", "llama", "gpt_neox"])
def test_saved_bytes_ratios(shape):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, bench.VOCAB, (SIZE["batch"], SIZE["seq"]), generator=g)
    seq_ids = torch.arange(1, SIZE["batch"] + 1)
    tok_ids = seq_ids.repeat_interleave(SIZE["seq"]).reshape(SIZE["batch"], SIZE["seq"])
    plain = {"input_ids": tokens, "labels": tokens}
    vanilla = bench.build(shape, SIZE)
    patched = bench.get_memsink_model(bench.build(shape, SIZE), bench.MEMSINK)
    reference = bench.build(shape, SIZE)
    general, sinks = bench.MEMSINK.num_sinks_for(SIZE["mlp"])
    bench.add_reference_hooks(reference, tok_ids, general)

    base = bench.saved_bytes(vanilla, plain)
    per_seq = bench.saved_bytes(patched, {**plain, "sequence_ids": seq_ids})
    per_tok = bench.saved_bytes(patched, {**plain, "sequence_ids": tok_ids})
    ref = bench.saved_bytes(reference, plain)
    # one bool mask shared by all layers: (B, 1, S) per sequence, (B, T, S) per token
    assert per_seq - base <= SIZE["batch"] * sinks
    assert per_tok - base <= SIZE["batch"] * SIZE["seq"] * sinks
    assert per_seq / base <= 1.01 and per_tok / base <= 1.02
    assert ref > per_tok  # a float mask per layer
