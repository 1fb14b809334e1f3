"""Checkpoints: the memsink checkpoint format, atomic writes, ``AutoMemSinkModelForCausalLM``,
and the sink-free export with its audit."""
