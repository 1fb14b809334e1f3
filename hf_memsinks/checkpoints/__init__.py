"""Checkpoints: the memsink checkpoint format (:mod:`.format`) and atomic writes (:mod:`.atomic`).

Loading is :class:`hf_memsinks.AutoMemSinkModelForCausalLM` (:mod:`hf_memsinks.model.loading`); what may
leave the machine (upload gate, audit, git hook) is :mod:`hf_memsinks.publishing`."""
