"""hf_memsinks: MemSinks (memorization sinks) for Hugging Face Transformers causal LMs."""

__version__ = "0.1.0"

from .auto import AutoMemSinkModelForCausalLM  # noqa: E402
from .config import MemSinkConfig  # noqa: E402
from .masks import NO_SEQUENCE, sink_mask  # noqa: E402
from .model import is_memsink_model, remove_sinks  # noqa: E402
from .patching import get_memsink_model  # noqa: E402

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
