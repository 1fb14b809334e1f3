"""The model inside the wrappers training puts around it: DDP and accelerate (``.module``), and
PEFT (``get_base_model()``). One function, so that every caller sees the same model."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without its DDP, accelerate and PEFT wrappers (itself when it has none)."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # DDP / accelerate
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # PEFT
        else:
            return model
