"""hf_memsinks: MemSinks (memorization sinks) for Hugging Face Transformers causal LMs."""

from . import global_patches
from .config import MemSinkConfig, PaperReference
from .data import GoldfishCollator, MemSinkDataCollator, MemSinkPackingCollator, add_sequence_ids, check_ids, stable_id
from .ids import NO_SEQUENCE, sink_mask
from .integrations.optimizer import attach_sink_lr
from .integrations.peft import train_sinks
from .integrations.trainer import MemSinkCallback
from .model.add_sinks import get_memsink_model
from .model.loading import AutoMemSinkModelForCausalLM
from .model.memsink_model import is_memsink_model, remove_sinks
from .publishing.upload_gate import SINKS_UPLOAD_CONSENT, SinkUploadError, allow_sinks_upload
from .version import __version__

# The upload gate on huggingface_hub, the default Trainer callbacks and the sinks in PEFT's adapter
# state: the only global changes
# (hf_memsinks/global_patches.py; off with HF_MEMSINKS_GLOBAL_PATCHES=0, or global_patches.uninstall()).
global_patches.install_on_import()

__all__ = [
    "AutoMemSinkModelForCausalLM",
    "GoldfishCollator",
    "MemSinkCallback",
    "MemSinkConfig",
    "MemSinkDataCollator",
    "MemSinkPackingCollator",
    "MemSinkSFTTrainer",
    "NO_SEQUENCE",
    "PaperReference",
    "SINKS_UPLOAD_CONSENT",
    "SinkUploadError",
    "add_sequence_ids",
    "attach_sink_lr",
    "check_ids",
    "allow_sinks_upload",
    "get_memsink_model",
    "is_memsink_model",
    "remove_sinks",
    "sink_mask",
    "stable_id",
    "train_sinks",
    "__version__",
]


def __getattr__(name: str):
    """``MemSinkSFTTrainer`` needs ``trl``, so it is imported on first use only."""
    if name == "MemSinkSFTTrainer":
        from .integrations.sft import MemSinkSFTTrainer

        return MemSinkSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
