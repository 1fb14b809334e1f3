"""Sink statistics in the training logs: norms of the general and sink parts of the patched
projections, which show whether the sinks absorb what the batches carry (``MemSinkCallback``)."""

from __future__ import annotations

import logging

import torch

from ..layers.projections import is_patched_projection
from ..unwrap import unwrap

logger = logging.getLogger(__name__)


def sink_statistics(model) -> dict[str, float]:
    """Norms of the general and sink parts of every patched projection, summed over layers.

    A sink norm that grows faster than the general one means the sinks are absorbing what the
    batches carry; a flat sink norm means no IDs reach the model.
    """
    general = sinks = 0.0
    count = 0
    with torch.no_grad():
        for module in unwrap(model).modules():
            if is_patched_projection(module) and module.memsink.role != "norm":
                g, s = module.general_and_sink_parts()["weight"]
                general += float(g.float().pow(2).sum())
                sinks += float(s.float().pow(2).sum())
                count += 1
    if count == 0:
        return {}
    general, sinks = general ** 0.5, sinks ** 0.5
    return {"memsink/general_weight_norm": general, "memsink/sink_weight_norm": sinks,
            "memsink/sink_to_general_norm": sinks / max(general, 1e-12)}


def log_sink_statistics(model, state) -> None:
    """Append the statistics to the Trainer's ``state.log_history`` (main process) and log them."""
    stats = sink_statistics(model)
    if stats and state.is_world_process_zero:
        state.log_history.append({**{k: round(v, 4) for k, v in stats.items()}, "step": state.global_step})
        logger.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
