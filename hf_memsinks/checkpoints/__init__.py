"""Checkpoints: the memsink checkpoint format (:mod:`.format`), the sink tensors in a state dict (:mod:`.sink_tensors`,
the state-dict hooks of the patched modules) and atomic writes (:mod:`.atomic`).

Loading is :class:`hf_memsinks.AutoMemSinkModelForCausalLM` (:mod:`hf_memsinks.model.loading`); what may
leave the machine (upload gate, audit, git hook) is :mod:`hf_memsinks.publishing`."""
