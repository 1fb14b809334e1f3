"""Every private name of Transformers that hf_memsinks uses, in one place.

Transformers changes its internals between releases without notice; keeping them here means an
upgrade breaks in this module alone. :func:`check_transformers_version` (run on import) refuses a
release older than the oldest one these names were tested with and warns on a minor release newer
than the newest; ``setup.cfg`` declares the same floor.
"""

from __future__ import annotations

import warnings

import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer
from transformers.utils import cached_file

__all__ = ["Conv1D", "NEWEST_TESTED", "OLDEST_TESTED", "causal_lm_class", "check_transformers_version",
           "class_ignoring_unexpected", "experts_forward", "get_checkpoint_func", "hub_file", "set_checkpoint_func",
           "ExpertsGateHook", "CheckpointingHook", "NoHubKernel", "drop_hub_kernel", "load_kwargs",
           "add_default_trainer_callback", "remove_default_trainer_callback", "loaded_from_checkpoint"]

# The oldest and the newest major.minor release of Transformers the core of the test suite passed
# with (`make test-compat` runs it on both; the minors between were checked once, README).
OLDEST_TESTED = "5.20"
NEWEST_TESTED = "5.25"


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Raise for a release older than :data:`OLDEST_TESTED`; warn for a minor release newer than
    :data:`NEWEST_TESTED` (it usually works: the names below change rarely, and the tests say which)."""
    if _minor(version) < _minor(OLDEST_TESTED):
        raise RuntimeError(
            f"hf_memsinks needs transformers>={OLDEST_TESTED} (the oldest release tested), not {version}"
        )
    if _minor(version) > _minor(NEWEST_TESTED):
        warnings.warn(
            f"hf_memsinks was tested with transformers {OLDEST_TESTED} to {NEWEST_TESTED}, not {version}: it may "
            "work, but the Transformers internals it uses (hf_memsinks/transformers_internals.py) were not "
            "checked against this release", UserWarning, stacklevel=2,
        )


check_transformers_version()


# ---- loading ----------------------------------------------------------------------------------------


def hub_file(path: str, filename: str, offline_is_missing: bool = True, **hub_kwargs) -> str | None:
    """The local path of ``filename`` in a Hub repository (downloaded if needed), or None when the
    repository has no such file (or, with ``offline_is_missing``, cannot be reached)."""
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=not offline_is_missing, **hub_kwargs)


def hub_file_or_raise(path: str, filename: str, **hub_kwargs) -> str:
    """As :func:`hub_file`, but a missing file is Transformers' own error."""
    return cached_file(path, filename, **hub_kwargs)


def causal_lm_class(config: PretrainedConfig) -> type | None:
    """The class ``AutoModelForCausalLM`` builds for ``config``, or None for a remote-code model."""
    mapping = AutoModelForCausalLM._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


def class_ignoring_unexpected(base: type, patterns: list[str]) -> type:
    """A subclass of ``base`` (same name and module) whose ``from_pretrained`` does not report
    unused checkpoint keys matching ``patterns`` (regular expressions)."""
    return type(base.__name__, (base,), {
        "_keys_to_ignore_on_load_unexpected": list(base._keys_to_ignore_on_load_unexpected or []) + patterns,
        "__module__": base.__module__,
    })


def load_kwargs(kwargs: dict) -> dict:
    """``from_pretrained`` keyword arguments for a load: Transformers 5.25 kernelizes every model it
    loads unless told not to (``use_kernels``), and raises when the ``kernels`` package is missing
    or of a version it does not take; unless the caller chose, such an environment loads without."""
    from transformers.utils import is_kernels_available

    if "use_kernels" in kwargs or is_kernels_available():
        return kwargs
    return {**kwargs, "use_kernels": False}


# ---- hub kernels ------------------------------------------------------------------------------------
# With use_kernels (from_pretrained's default from 5.25; model.set_use_kernels(True) before), the
# kernels package replaces the forward of each module whose class names a hub layer
# (use_kernel_forward_from_hub: "RMSNorm", "SiLU", ...) by a kernel's where its mapping has one for
# the device (Transformers' default mapping: CUDA, ROCm, XPU), and again on each train()/eval().


class NoHubKernel:
    """Mixed in ahead of a patched module's class: ``kernelize`` leaves the module alone (the per-class
    condition of ``use_kernel_forward_from_hub`` says no), so the forward that applies its sinks keeps
    running; a kernel would compute the plain layer (BitNet's ``ffn_sub_norm`` is an ``"RMSNorm"``)."""

    kernel_condition = staticmethod(lambda module: False)


def drop_hub_kernel(module) -> None:
    """Give ``module`` its class's forward back where ``kernelize`` set a kernel's on the instance
    (a model loaded with ``use_kernels``, then patched)."""
    if module.__dict__.pop("_kernel_repo", None) is not None:
        module.__dict__.pop("forward", None)


# ---- mixture-of-experts modules ---------------------------------------------------------------------


def experts_forward(module):
    """Transformers' own experts function for ``module``: ``grouped_mm`` when that is the model's
    experts implementation (rows sorted by expert), else ``batched_mm`` (rows in token order).
    Returns ``(function, grouped)``."""
    from transformers.integrations import moe

    grouped = getattr(module.config, "_experts_implementation", None) == "grouped_mm"
    return (moe.grouped_mm_experts_forward if grouped else moe.batched_mm_experts_forward), grouped


class ExpertsGateHook:
    """Mixed in ahead of a gated experts module's class: the experts functions call
    ``_apply_gate`` on the gate/up output; the hidden neurons it returns go through
    ``self.after_gate`` (which the mixin's user defines)."""

    def _apply_gate(self, gate_up):
        return self.after_gate(super()._apply_gate(gate_up))


# ---- activation checkpointing -----------------------------------------------------------------------


def get_checkpoint_func(module):
    """The checkpoint function Transformers set on a layer with checkpointing on, or None."""
    return getattr(module, "_gradient_checkpointing_func", None)


def set_checkpoint_func(module, func) -> None:
    module._gradient_checkpointing_func = func


class CheckpointingHook:
    """Mixed in ahead of a model class: ``gradient_checkpointing_enable()`` passes its checkpoint
    function through ``self.wrap_checkpoint_func`` (which the mixin's user defines)."""

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        func = self.wrap_checkpoint_func(gradient_checkpointing_func)
        return super()._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=func, **kwargs)


# ---- Trainer ----------------------------------------------------------------------------------------


def add_default_trainer_callback(callback: type) -> None:
    """Every ``Trainer`` built from now on gets an instance of ``callback``, as it gets its own
    ``DefaultFlowCallback``."""
    from transformers import trainer

    if callback not in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.append(callback)


def remove_default_trainer_callback(callback: type) -> None:
    """Undo :func:`add_default_trainer_callback` (Trainers built before keep their instance)."""
    from transformers import trainer

    if callback in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.remove(callback)


def loaded_from_checkpoint(model) -> bool:
    """Whether ``from_pretrained`` loaded any of the model's weights: its loader marks the parameters
    it fills (``_is_hf_initialized``); ``from_config`` leaves them unmarked even when the config came
    from a checkpoint (a copy with ``copy.deepcopy`` loses the marks too)."""
    return any(getattr(p, "_is_hf_initialized", False) for p in model.parameters())
