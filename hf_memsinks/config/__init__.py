"""The configuration: :class:`MemSinkConfig` (the settings a user chooses, :mod:`.memsink_config`), its
field checks (:mod:`.checks`), the published code's switches (:class:`PaperReference`, :mod:`.reference`)
and ``memsink_config.json`` (:mod:`.files`)."""

from .checks import did_you_mean
from .files import CONFIG_NAME, RECORD_KEYS, config_file_text, find_config_file, read_config_file
from .memsink_config import FINETUNE_RECIPE, MODES, SIGHTINGS_BY, SINK_INITS, MemSinkConfig
from .reference import EVAL_SCALINGS, MASK_SCHEMES, REFERENCE_SWITCHES, PaperReference

__all__ = ["CONFIG_NAME", "EVAL_SCALINGS", "FINETUNE_RECIPE", "MASK_SCHEMES", "MODES", "RECORD_KEYS",
           "REFERENCE_SWITCHES", "SIGHTINGS_BY", "SINK_INITS", "MemSinkConfig", "PaperReference", "config_file_text",
           "did_you_mean", "find_config_file", "read_config_file"]
