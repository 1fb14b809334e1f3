"""hf_memsinks: MemSinks (memorization sinks) for Hugging Face Transformers causal LMs."""

__version__ = "0.1.0"

from .config import MemSinkConfig  # noqa: E402
from .masks import NO_SEQUENCE, sink_mask  # noqa: E402
from .model import (  # noqa: E402
    AutoMemSinkModelForCausalLM,
    get_memsink_model,
    is_memsink_model,
    remove_sinks,
)

__all__ = [
    "AutoMemSinkModelForCausalLM",
    "MemSinkConfig",
    "NO_SEQUENCE",
    "get_memsink_model",
    "is_memsink_model",
    "remove_sinks",
    "sink_mask",
    "__version__",
]
