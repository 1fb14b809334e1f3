"""One patched MLP: its projections (or batched experts module) and its split into general and
sink neurons. Patching creates it, removal consumes it; the modules do the work themselves
(:class:`hf_memsinks.layers.projections.SinkProjection`, :class:`hf_memsinks.layers.experts.SinkExperts`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts import patch_experts
from .projections import patch_projection
from .state import SinkState


@dataclass
class PatchedMLP:
    """One patched MLP: its projections and neuron counts."""

    name: str
    layer: int
    in_proj: list[nn.Module]
    out_proj: nn.Module
    general: int
    sinks: int
    chunks: int
    width_attr: str | None = None
    kind: str = "mlp"  # "experts": out_proj is a batched experts module (hf_memsinks.layers.experts)
    norm: nn.Module | None = None  # a norm over the hidden neurons, applying the sinks at its input

    def modules(self) -> list[nn.Module]:
        """The patched modules, input projections first (the order new sink weights are drawn in)."""
        return [*self.in_proj, self.out_proj] + ([self.norm] if self.norm is not None else [])

    def kept_width(self, forget_ids=None) -> int:
        """Width of this MLP in the sink-free model: general only, or every neuron (sinks kept at
        their expected value, or zeroed where a norm over the neurons needs the full width)."""
        return self.general if forget_ids is None and self.norm is None else self.general + self.sinks

    def patch(self, state: SinkState, external_width: int) -> None:
        """Swap in the sink-aware classes; ``external_width``: the width in checkpoints."""
        if self.kind == "experts":
            patch_experts(self.out_proj, general=self.general, sinks=self.sinks, layer=self.layer, state=state,
                          external_width=external_width)
            return
        roles = [(m, "in") for m in self.in_proj] + [(self.out_proj, "out")]
        for module, role in roles + ([(self.norm, "norm")] if self.norm is not None else []):
            patch_projection(module, role, general=self.general, sinks=self.sinks, chunks=self.chunks,
                             layer=self.layer, state=state, external_width=external_width,
                             behind_norm=self.norm is not None)

    def grow(self, init_seed: int, random_init: bool) -> None:
        """Append the sink neurons (``"add"`` mode): the same new weights on every process."""
        generator = torch.Generator().manual_seed(init_seed * 1_000_003 + self.layer)
        for module in self.modules():
            module.grow(generator, random_init)

    def fold(self, general_scale: float, sink_coef: torch.Tensor | None, width: int) -> None:
        """Plain weights and classes again (see :meth:`hf_memsinks.layers.projections.SinkProjection.fold`)."""
        for module in self.modules():
            module.fold(general_scale, sink_coef, width)
