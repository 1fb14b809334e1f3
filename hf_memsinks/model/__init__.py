"""The patched model: ``get_memsink_model``, the forward with ``sequence_ids``, eval modes,
``remove_sinks`` and forgetting."""
