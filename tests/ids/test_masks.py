"""Masks: density, independence, determinism, reserved ID, and the published function."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_memsinks.ids.masks import NO_SEQUENCE, REFERENCE_A, REFERENCE_M, hash_mask, reference_mask, sink_mask

S, P = 300, 0.3


def test_density_within_one_percent_over_10k_ids():
    ids = torch.randint(0, 2**62, (10_000,))
    for p in (0.1, 0.3, 0.5):
        density = sink_mask(ids, S, p).float().mean().item()
        assert abs(density - p) / p < 0.01, (p, density)
    density = sink_mask(torch.arange(1, 10_001), S, P).float().mean().item()
    assert abs(density - P) / P < 0.01


def _pair_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a & b).float().mean().item()


def test_sequential_ids_as_independent_as_random_ones():
    seq = sink_mask(torch.arange(1, 10_001), S, P)
    rnd = sink_mask(torch.randint(0, 2**62, (10_000,)), S, P)
    # Two independent masks share a sink with probability p^2.
    seq_overlap = _pair_overlap(seq[:-1], seq[1:])
    rnd_overlap = _pair_overlap(rnd[:-1], rnd[1:])
    assert abs(seq_overlap - P**2) / P**2 < 0.02
    assert abs(rnd_overlap - P**2) / P**2 < 0.02
    # Per-sink correlation between neighbouring IDs is ~0 (std of the estimate ~0.01/sqrt(S)).
    a, b = seq[:-1].float(), seq[1:].float()
    corr = ((a - a.mean(0)) * (b - b.mean(0))).mean(0) / (a.std(0) * b.std(0))
    assert corr.mean().abs().item() < 0.005


def test_salt_and_layer_give_independent_masks():
    ids = torch.arange(1, 5001)
    base = sink_mask(ids, S, P)
    for other in (sink_mask(ids, S, P, salt=1), sink_mask(ids, S, P, layer=0), sink_mask(ids, S, P, layer=1)):
        assert abs(_pair_overlap(base, other) - P**2) / P**2 < 0.03
    assert torch.equal(sink_mask(ids, S, P, layer=3), sink_mask(ids, S, P, layer=3))


def test_deterministic_across_dtypes_shapes_and_processes():
    ids = torch.tensor([1, 2, 3, 2**40 + 7, 123456789])
    m = sink_mask(ids, 64, P)
    assert torch.equal(m, sink_mask(ids.int()[:3].long().tolist() + ids[3:].tolist(), 64, P))
    assert torch.equal(m[:3], sink_mask(ids[:3].to(torch.int32), 64, P))
    per_token = sink_mask(ids.reshape(1, 5).expand(2, 5), 64, P)
    assert per_token.shape == (2, 5, 64) and torch.equal(per_token[1], m)
    code = (
        "import torch; from hf_memsinks.ids.masks import sink_mask; "
        "m = sink_mask(torch.tensor([1, 2, 3, 2**40 + 7, 123456789]), 64, 0.3); "
        "print(''.join('1' if v else '0' for v in m.flatten().tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "".join("1" if v else "0" for v in m.flatten().tolist())


def test_reserved_id_activates_no_sink_and_zero_is_ordinary():
    m = sink_mask(torch.tensor([[NO_SEQUENCE, 0, 5]]), S, P)
    assert not m[0, 0].any()
    assert 0.15 < m[0, 1].float().mean().item() < 0.45


def test_rejects_float_ids():
    with pytest.raises(TypeError, match="integer"):
        sink_mask(torch.tensor([1.0]), 8, P)


def _reference_by_definition(ids, num_sinks, p):
    """The published function, written from its definition with Python big integers."""

    def signed(v):
        v %= 2**64
        return v - 2**64 if v >= 2**63 else v

    out = np.zeros((len(ids), num_sinks), dtype=bool)
    for i, s in enumerate(ids):
        s2 = signed(s * 65536)
        for j in range(num_sinks):
            p_j = signed(pow(REFERENCE_A, j, 2**64)) % REFERENCE_M
            r = signed(s2 * p_j) % REFERENCE_M
            out[i, j] = np.float32(r) / np.float32(REFERENCE_M) < np.float32(p)
    return out


def test_reference_scheme_matches_published_definition():
    ids = [1, 2, 3, 17, 1000, 65537, 2**31 + 11, 2**45 + 3]
    got = sink_mask(torch.tensor(ids), 40, P, scheme="reference").numpy()
    assert (got == _reference_by_definition(ids, 40, P)).all()
    # The published masks depend on int64 overflow from j = 3 on: check the power wraps.
    assert signed_pow_wraps()


def signed_pow_wraps():
    p3 = torch.pow(torch.tensor(REFERENCE_A), torch.tensor(3)).item()
    return p3 != REFERENCE_A**3 and (p3 - REFERENCE_A**3) % 2**64 == 0


def test_reference_scheme_rejects_id_zero_and_keeps_reserved():
    with pytest.raises(ValueError, match="ID 0"):
        sink_mask(torch.tensor([3, 0]), 8, P, scheme="reference")
    assert not sink_mask(torch.tensor([NO_SEQUENCE]), 8, P, scheme="reference").any()
    # Known property of the published function: IDs 1 and 2 share about 65% more
    # sinks than independent masks would.
    m = sink_mask(torch.tensor([1, 2]), 30_000, P, scheme="reference")
    assert 1.55 < _pair_overlap(m[:1], m[1:]) / P**2 < 1.75


@pytest.mark.parametrize("scheme", ["hash", "reference"])
def test_per_token_masks_built_per_distinct_id_equal_the_elementwise_hash(scheme):
    """sink_mask hashes each distinct ID once and expands; the result is bit-identical to hashing
    every token, over random packed layouts with padding (-1) and per-layer keys."""
    g = torch.Generator().manual_seed(0)
    direct = {"hash": lambda ids, layer: hash_mask(ids, 97, 0.3, salt=5, layer=layer),
              "reference": lambda ids, layer: reference_mask(ids, 97, 0.3)}[scheme]
    for trial in range(20):
        b, t = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        docs = torch.randint(1, 2**40, (b, 8), generator=g)
        lengths = torch.randint(1, 12, (b, 8), generator=g)
        rows = [torch.repeat_interleave(d, n) for d, n in zip(docs, lengths)]
        ids = torch.stack([torch.cat([r, torch.full((t,), -1)])[:t] for r in rows])
        ids[:, t - t // 4:] = -1  # right padding
        layer = None if scheme == "reference" else trial % 3
        kwargs = {} if scheme == "reference" else {"salt": 5, "layer": layer}
        ours = sink_mask(ids, 97, 0.3, scheme=scheme, **kwargs)
        assert ours.dtype == torch.bool and ours.shape == (b, t, 97)
        assert torch.equal(ours, direct(ids, layer))
