"""Which sightings of a document have its sinks on: the privacy setting,
``MemSinkConfig.general_sightings`` (which sightings train the general path, and which only its
sinks), and ``sinks_from_sighting`` (its sinks on from the K-th sighting only), in one place.

* :mod:`.counts`: how often each ID (and each content) has been seen, exactly, across processes;
* :mod:`.routing`: a training forward split into the sightings that train the general path (no sink
  on) and those that train only their own sinks (everything else frozen for them);
* :mod:`.hold`: the optimizer hook that keeps the general path and its optimizer state unchanged on
  steps that trained only sinks;
* :mod:`.saved_counts`: the counts saved and restored with the optimizer's state, so a resumed run
  continues them;
* :mod:`.later_sinks`: a training forward's early sightings (before the K-th) without their ID.

The settings themselves are fields of :class:`hf_memsinks.MemSinkConfig` (``general_sightings``,
``sinks_from_sighting``, ``sightings_by``); the patched forward calls :func:`.routing.routed_forward`
or :func:`.later_sinks.later_sighting_ids`.
"""
