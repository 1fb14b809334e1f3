"""Plain LoRA around a patched projection on the gathered path (``compute_active_sinks_only``):
what the usual fine-tune runs (LoRA on every linear layer, the sinks trained stored apart),
so that an adapter on the MLP no longer makes every sink computed, then masked.

The wrapper's output is its base's gathered output (:mod:`.active_sinks`) plus LoRA's contribution
restricted the same way, times its scaling:

* an input projection: ``lora_A(dropout(x))``, then lora_B's general rows and, per batch row, its
  gathered sink rows (lora_B's rows are the projection's neurons, chunks included);
* the output projection reads the gathered hidden state: lora_A's general columns and, per batch
  row, its gathered sink columns, applied to ``dropout`` of the masked gathered input, then lora_B.

The dropout is the adapter's own module, applied to the projection's input as PEFT applies it. At
an output projection that input is the gathered one, ``general + k`` wide instead of
``general + S``: the same distribution (each element kept with probability 1 - p, masked sinks zero
either way), but other random draws than the dense path's.
"""

from __future__ import annotations

import torch
from torch import nn

from .active_sinks import (
    active_sinks_for,
    by_row,
    gather_columns,
    gather_rows,
    gathered_input,
    gathered_output,
    masked_gathered,
)
from .lora_parts import LoraParts, base_of, plain_lora
from .state import ActiveSinks


def active_sinks_of(wrapper: nn.Module, x: torch.Tensor) -> ActiveSinks | None:
    """The active sinks where the projection ``wrapper`` wraps computes only those, else None."""
    proj = base_of(wrapper)
    return active_sinks_for(proj, proj.memsink.state.call_for_projection(proj.training), x)


def lora_gathered(wrapper: nn.Module, x: torch.Tensor, active: ActiveSinks) -> torch.Tensor:
    """The wrapper's output on the gathered path (``active`` from :func:`active_sinks_of`, which
    checked that every adapter of the MLP is plain LoRA)."""
    proj, lora = base_of(wrapper), plain_lora(wrapper)
    m = proj.memsink
    if m.role == "in":
        base = gathered_input(proj, x, active)
        a = lora.lora_A(lora.dropout(_cast(x, lora)))
        spans = list(zip(m.general_spans, m.sink_spans))  # (lora_B stores one neuron per row)
        delta = gather_rows(by_row(a, active), lora.lora_B.weight, lora.lora_B.bias, 0, spans, active.index)
    else:
        masked = masked_gathered(proj, x, active)
        base = gathered_output(proj, x, active, masked)
        a = gather_columns(lora.dropout(_cast(masked, lora)), lora.lora_A.weight, lora.lora_A.bias, 1, m.general,
                           active.index)
        delta = lora.lora_B(a)
    return (base + delta.reshape(base.shape) * lora.scaling).to(base.dtype)


def _cast(x: torch.Tensor, lora: LoraParts) -> torch.Tensor:
    dtype = lora.lora_A.weight.dtype
    return x.to(dtype) if lora.cast_input and x.dtype != dtype else x
