"""Finding a model's MLPs: by the user's names, from a checkpoint's record, or from the model's
structure (discovery, checked by model forwards), and the config fields that size them."""
