"""TRL's ``SFTTrainer`` with sequence IDs that reach the model.

Plain ``SFTTrainer`` drops every dataset column but its own (``input_ids``, ``labels``,
``seq_lengths``), packs only ``input_ids`` and ``labels``, and builds batches with its own
collators, so ``sequence_ids`` never reach a patched model, whose training forward then stops
with the "needs sequence_ids" error at the first step. :class:`MemSinkSFTTrainer` is
``SFTTrainer`` with three small changes and TRL's defaults otherwise (fused LM head,
padding-free packing, assistant-only loss, ``peft_config``):

* the ``sequence_ids`` column is kept through dataset preparation; with packing it becomes a
  per-token column before TRL's own ``pack_dataset``, so every packed token keeps its document's ID;
* batches get ``sequence_ids`` next to TRL's keys: ``(batch,)``, or ``(batch, seq_len)`` for
  packed or padding-free rows, ``-1`` on padding;
* with ``peft_config``, the sinks stay fully trainable next to the adapter (:func:`train_sinks`);
* ``push_to_hub=True`` without a :class:`MemSinkCallback` is refused when the trainer is built.

TRL's fused LM head calls the backbone directly with the batch's keys; the patched backbone
takes ``sequence_ids`` too, so the masks act on that path as on the plain forward. Under
``MemSinkConfig.general_sightings`` a training step goes through the model's own forward
instead (``Trainer.compute_loss``), which routes each sighting; TRL's token accuracy and entropy
are then not logged. Under ``sinks_from_sighting`` the backbone's forward counts the sightings itself;
TRL's extra pass without gradients (for some losses' metrics) is not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names, pack_dataset

from ..data.collators import example_ids
from ..data.sequence_ids import ID_COLUMN
from ..ids.masks import NO_SEQUENCE
from ..model.memsink_model import is_memsink_model
from ..publishing.pushes import refuse_trainer_push
from ..unwrap import unwrap
from .peft import train_sinks
from .trainer import MemSinkCallback


class SequenceIdCollator:
    """Wraps a collator: the batch it builds plus the examples' ``sequence_ids``.

    An example's ID is one integer or one per token. Rows the inner collator pads get ``-1``;
    when it concatenates the examples into one padding-free row, the IDs follow each example.
    Examples without IDs (an evaluation set) leave the batch as the inner collator made it; IDs
    are validated as everywhere else (:func:`hf_memsinks.data.collators.example_ids`).

    Args:
        collator: the collator to wrap (TRL's ``DataCollatorForLanguageModeling``, say).
    """

    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name: str) -> Any:  # TRL reads options of its collator
        inner = self.__dict__.get("collator")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator([{k: v for k, v in e.items() if k != ID_COLUMN} for e in examples])
        if ID_COLUMN in batch or all(ID_COLUMN not in e for e in examples):
            return batch
        ids = [example_ids(e, i, ID_COLUMN, len(e["input_ids"])) for i, e in enumerate(examples)]
        rows, length = batch["input_ids"].shape
        per_token = any(isinstance(i, (list, tuple)) for i in ids)
        if rows == 1 and len(examples) > 1:  # padding-free: the examples were concatenated into one row
            tokens = [_per_token(i, len(e["input_ids"])) for i, e in zip(ids, examples)]
            batch[ID_COLUMN] = _padded([sum(tokens, [])], length)
        elif per_token:
            batch[ID_COLUMN] = _padded([_per_token(i, len(e["input_ids"])) for i, e in zip(ids, examples)], length)
        else:
            batch[ID_COLUMN] = torch.tensor(ids, dtype=torch.long)
        return batch


def _per_token(ids: int | list[int], length: int) -> list[int]:
    return list(ids) if isinstance(ids, list) else [ids] * length


def _padded(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), NO_SEQUENCE, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.tensor(row[:length], dtype=torch.long)
    return out


class MemSinkSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` for a model patched with sinks; the training dataset needs a
    ``sequence_ids`` column (:func:`hf_memsinks.data.add_sequence_ids` adds one).

    Args:
        train_sinks_with_adapter: with ``peft_config``, keep the sink neurons trainable next to
            the adapter while the general neurons change only through it (default True).
        *args, **kwargs: as for ``SFTTrainer``.
    """

    def __init__(self, *args, train_sinks_with_adapter: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if not is_memsink_model(inner):
            raise ValueError(
                "MemSinkSFTTrainer needs a model patched with sinks: get_memsink_model(model, MemSinkConfig()) "
                "or AutoMemSinkModelForCausalLM.from_pretrained(...) before building the trainer"
            )
        if inner is not self.model and train_sinks_with_adapter:
            train_sinks(self.model)
        self.data_collator = SequenceIdCollator(self.data_collator)

    def init_hf_repo(self, *args, **kwargs):
        """``push_to_hub=True`` would upload the sinks at every push: refused here, when the trainer
        is built (before the repository is created), unless a :class:`MemSinkCallback` takes the
        pushes over (it pushes the sink-free export, or sinks to a private repo when opted in)."""
        if not any(isinstance(cb, MemSinkCallback) for cb in self.callback_handler.callbacks):
            refuse_trainer_push(self.args, self.model, "MemSinkSFTTrainer(args=SFTConfig(push_to_hub=True))")
        return super().init_hf_repo(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, except under ``general_sightings``: the fused LM head runs the backbone alone,
        which cannot route a sighting, so the step takes the model's own forward and loss."""
        inner = unwrap(model)
        if model.training and is_memsink_model(inner) and inner.memsink.config.general_sightings is not None:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ID_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ID_COLUMN]

    def _reject_skip_prepare_without_labels(self, datasets, data_collator):
        inner = data_collator.collator if isinstance(data_collator, SequenceIdCollator) else data_collator
        return super()._reject_skip_prepare_without_labels(datasets, inner)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = get_dataset_column_names(dataset)
        if ID_COLUMN not in columns:
            if dataset_name == "train":
                raise ValueError(
                    f"the training dataset has no {ID_COLUMN!r} column (it has {columns}): add one with "
                    "hf_memsinks.data.add_sequence_ids(dataset, by='content') or by='metadata', column=..."
                )
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if not packing or "seq_lengths" in columns:  # (already packed: TRL's preparation is idempotent)
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        # TRL packs only input_ids and labels: tokenize and label with TRL (no truncation, as when
        # packing), give every token its document's ID, then pack the three columns with TRL's packer.
        max_length, args.max_length = args.max_length, None
        try:
            dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        finally:
            args.max_length = max_length

        def per_token(batch):
            return {ID_COLUMN: [_per_token(i, len(t)) for i, t in zip(batch[ID_COLUMN], batch["input_ids"])]}

        map_kwargs = {}
        if isinstance(dataset, Dataset):  # IterableDataset.map takes neither
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Packing {dataset_name} dataset"}
        dataset = dataset.map(per_token, batched=True, **map_kwargs)
        dataset = dataset.select_columns(["input_ids", "labels", ID_COLUMN])
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset
