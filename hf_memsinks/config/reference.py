"""PaperReference: the switches that reproduce the published MemSinks code where ours differs. Only a
comparison with the paper needs them, so they are one field of MemSinkConfig (``reference``), not
beside the settings every user chooses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .checks import Invalid, boolean, fail, one_of, setting, unknown_keys, validate

EVAL_SCALINGS = ("none", "paper")
MASK_SCHEMES = ("hash", "reference")


@dataclass(frozen=True)
class PaperReference:
    """The published code's switches; ``PaperReference()`` is ours, :meth:`published` theirs."""

    eval_scaling: str = setting("none", one_of(EVAL_SCALINGS), help=(
        "how general neurons are scaled when sinks are dropped at evaluation: 'none' (x1, ours) or 'paper' "
        "(x (p_gen + p_mem) / p_gen, as the published code does)."))
    mask_scheme: str = setting("hash", one_of(MASK_SCHEMES), help=(
        "'hash' (ours: 64-bit mixing, any non-negative ID) or 'reference' (the published function, bit for "
        "bit; ID 0 is rejected there, and it takes no salt and no per-layer masks)."))
    per_layer_masks: bool = setting(False, boolean, help=(
        "draw an independent mask per layer instead of one mask shared by all layers (the published "
        "setting). Costs one mask per layer per forward."))

    def __post_init__(self) -> None:
        validate(self)
        if self.mask_scheme == "reference" and self.per_layer_masks:
            fail(self, "per_layer_masks", "the reference mask scheme shares one mask across layers")

    @classmethod
    def published(cls) -> "PaperReference":
        """The published code's settings: its eval scaling and its mask function (one mask for all layers)."""
        return cls(eval_scaling="paper", mask_scheme="reference", per_layer_masks=False)


REFERENCE_SWITCHES = tuple(f.name for f in dataclasses.fields(PaperReference))
OURS = PaperReference()


def reference_or_none(value):
    """MemSinkConfig.reference's check: a PaperReference, or a dict of its fields (JSON, YAML); one equal
    to ours is stored as None, so a config has one form and its JSON stays without the key."""
    if isinstance(value, dict):
        if unknown_keys(value, REFERENCE_SWITCHES):
            raise Invalid(unknown_keys(value, REFERENCE_SWITCHES))
        value = PaperReference(**value)
    if value is not None and not isinstance(value, PaperReference):
        raise Invalid("must be a PaperReference (PaperReference.published(): the published code's settings) "
                      "or None")
    return None if value == OURS else value
