"""Publishing: everything that decides whether bytes may leave the machine, in one place.

* :mod:`.content`: what a file holds, whatever its name (safetensors, torch checkpoints, pickles,
  archives);
* :mod:`.upload_gate`: the check every upload meets (sink tensors, memsink files, adapters on sink
  neurons) and the opt-in by name (``allow_sinks_upload``, private repositories only);
* :mod:`.hub_internals`: huggingface_hub's upload entry points, wrapped so the gate sees every file
  (installed by :mod:`hf_memsinks.global_patches`);
* :mod:`.pushes`: the push paths' own checks, before anything is written: the patched model's
  ``push_to_hub``, the ``Trainer``'s ``push_to_hub=True`` (``PushGuard``, ``MemSinkCallback``'s
  take-over) and ``MemSinkSFTTrainer``;
* :mod:`.audit`: a directory checked for any trace of sinks (``hf-memsinks audit``, every export);
* :mod:`.git_hook`: the git pre-push hook (``hf-memsinks install-hook``, ``audit --git-push``).

It sits below the model (which refuses its own pushes through :mod:`.pushes`) and above the
checkpoint format, whose sink key names it reads.
"""
