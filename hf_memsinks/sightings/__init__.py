"""The privacy setting, ``MemSinkConfig.general_sightings``, in one place: which sightings of a
document train the general path, and which only its sinks.

* :mod:`.counts`: how often each ID (and each content) has been seen, exactly, across processes;
* :mod:`.routing`: a training forward split into the sightings that train the general path (no sink
  on) and those that train only their own sinks (everything else frozen for them);
* :mod:`.hold`: the optimizer hook that keeps the general path and its optimizer state unchanged on
  steps that trained only sinks;
* :mod:`.saved_counts`: the counts saved and restored with the optimizer's state, so a resumed run
  continues them.

The settings themselves are fields of :class:`hf_memsinks.MemSinkConfig` (``general_sightings``,
``sightings_by``); the patched forward calls :func:`.routing.routed_forward`.
"""
