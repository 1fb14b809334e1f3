"""Sequence ID -> which sink neurons are active. Pure int64 tensor ops, no tables, no loops.

A mask is a function of (ID, sink index, salt[, layer]) only, so every process, device and
repetition of a document computes the same one. Integer arithmetic wraps (two's complement),
which torch does identically on CPU and GPU, and the final test is an integer comparison, so no
floating-point rounding can differ between devices.

``NO_SEQUENCE`` (-1) is reserved: it activates no sink (padding, unlabeled text). Other negative
IDs are refused where IDs enter the library (:mod:`hf_memsinks.ids.validation`); should one reach a mask
unchecked (a tensor on an accelerator, whose values forward does not read back), it activates no
sink either.
"""

from __future__ import annotations

import torch

from .validation import NO_SEQUENCE, check_id_dtype

__all__ = ["GOLDEN", "NO_SEQUENCE", "REFERENCE_A", "REFERENCE_M", "hash_mask", "mix64", "reference_mask", "shift_right",
           "sink_mask"]

# splitmix64 constants, written as signed int64.
GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB

# Published MemSinks mask function (a Lehmer generator modulo 2**32 - 5).
REFERENCE_A = 1588635695
REFERENCE_M = 4294967291
REFERENCE_SHIFT = 65536


def shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on signed ints)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijection on 64-bit words with full avalanche."""
    z = (z ^ shift_right(z, 30)) * _MIX1
    z = (z ^ shift_right(z, 27)) * _MIX2
    return z ^ shift_right(z, 31)


def _as_ids(sequence_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(sequence_ids, torch.Tensor):
        sequence_ids = torch.as_tensor(sequence_ids)
    check_id_dtype(sequence_ids)
    return sequence_ids.long()


def hash_mask(
    sequence_ids: torch.Tensor,
    num_sinks: int,
    active_prob: float,
    salt: int = 0,
    layer: int | None = None,
) -> torch.Tensor:
    """Bool tensor ``(*ids.shape, num_sinks)``: sink ``j`` is active for ID ``s`` with probability
    ``active_prob``, independently across IDs and sinks (sequential IDs included)."""
    ids = _as_ids(sequence_ids)
    key = _wrap(salt * GOLDEN + (0 if layer is None else (layer + 1) * _MIX1))
    per_id = mix64(mix64(ids ^ key) + GOLDEN)  # (...,)
    sink_keys = mix64(torch.arange(num_sinks, device=ids.device, dtype=torch.long) * GOLDEN + key)
    z = mix64(per_id.unsqueeze(-1) ^ sink_keys)  # (..., S)
    threshold = int(round(active_prob * 2.0**53))
    active = shift_right(z, 11) < threshold
    return active & (ids >= 0).unsqueeze(-1)  # every negative ID: no sequence


def _wrap(value: int) -> int:
    """Python int -> the int64 with the same low 64 bits."""
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def reference_mask(sequence_ids: torch.Tensor, num_sinks: int, active_prob: float) -> torch.Tensor:
    """The published function, bit for bit: ``P_j = a**j % M`` (int64 power, wrapping),
    active iff ``((s * 65536 * P_j) % M) / M < p``. ID 0 would activate every sink there, so it
    is rejected (a check that reads the IDs on the host: one device sync per forward, which the
    default hash scheme does not have); -1 is our reserved "no sequence" ID."""
    ids = _as_ids(sequence_ids)
    if bool((ids == 0).any()):
        raise ValueError(
            "sequence ID 0 is not allowed with mask_scheme='reference': the published mask "
            "function activates every sink for it. Use IDs >= 1 (or mask_scheme='hash')."
        )
    powers = torch.pow(torch.tensor(REFERENCE_A, dtype=torch.long, device=ids.device),
                       torch.arange(num_sinks, dtype=torch.long, device=ids.device))
    p_j = torch.remainder(powers, REFERENCE_M)
    scaled = ids * REFERENCE_SHIFT
    residue = torch.remainder(scaled.unsqueeze(-1) * p_j, REFERENCE_M)
    active = residue.to(torch.float32) / torch.tensor(REFERENCE_M, dtype=torch.float32) < torch.tensor(
        active_prob, dtype=torch.float32
    )
    return active & (ids >= 0).unsqueeze(-1)  # every negative ID: no sequence


@torch.compiler.disable
def sink_mask(
    sequence_ids: torch.Tensor,
    num_sinks: int,
    active_prob: float,
    *,
    salt: int = 0,
    layer: int | None = None,
    scheme: str = "hash",
) -> torch.Tensor:
    """Bool mask ``(*ids.shape, num_sinks)`` of active sinks; IDs of shape (B,) or (B, T).

    Always runs eagerly, also inside ``torch.compile``: the hash relies on int64 wraparound,
    which is undefined behaviour in the C++ that inductor generates. Compiled on CPU (torch
    2.13), ``arange(S) * constant`` gave wrong masks and corrupted the heap. Masks are built once
    per forward, so running them eagerly costs one graph break at the start of the forward.
    """
    if scheme == "hash":
        def build(ids):
            return hash_mask(ids, num_sinks, active_prob, salt=salt, layer=layer)
    elif scheme == "reference":
        if layer is not None or salt != 0:
            raise ValueError("the reference mask scheme has one mask shared by all layers and no salt")

        def build(ids):
            return reference_mask(ids, num_sinks, active_prob)
    else:
        raise ValueError(f"unknown mask scheme {scheme!r}; use 'hash' or 'reference'")
    return per_distinct_id(build, _as_ids(sequence_ids))


def per_distinct_id(build, ids: torch.Tensor) -> torch.Tensor:
    """``build(ids)``, computed once per distinct ID and expanded: per-token IDs (packed documents)
    repeat each ID over a document's tokens, and the hash is the costly part. Exact, as a mask is
    a function of the ID alone. Only on the CPU: counting the distinct IDs of a tensor on an
    accelerator would read it back (a device sync per forward), and there the elementwise hash
    costs little beside the step."""
    if ids.dim() < 2 or ids.device.type != "cpu":
        return build(ids)
    distinct, inverse = torch.unique(ids, return_inverse=True)
    return build(distinct)[inverse]
