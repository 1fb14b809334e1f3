"""Plain Trainer with default TrainingArguments keeps the sequence_ids column and applies masks."""

import torch
from datasets import Dataset
from tiny_models import tiny_model
from transformers import Trainer, TrainingArguments

from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask
from hf_memsinks.layers.neurons import neuron_dim
from hf_memsinks.layers.projections import is_patched_projection


def test_trainer_default_args_keep_ids_and_move_only_that_ids_sinks(tmp_path):
    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
    model = get_memsink_model(tiny_model("gpt2"), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (16,), generator=g).tolist(), "sequence_ids": 42} for _ in range(8)]
    ds = Dataset.from_list(rows)
    collate = lambda b: {  # noqa: E731
        "input_ids": torch.tensor([r["input_ids"] for r in b]),
        "labels": torch.tensor([r["input_ids"] for r in b]),
        "sequence_ids": torch.tensor([r["sequence_ids"] for r in b]),
    }
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=0.1, optim="sgd", weight_decay=0.0, report_to=[], use_cpu=True,
                             lr_scheduler_type="constant", save_strategy="no")
    assert args.remove_unused_columns
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate).train()
    for name, module in model.named_modules():
        if is_patched_projection(module):
            dim = neuron_dim(module, module.memsink.role)
            delta = (module.weight - before[f"{name}.weight"]).narrow(dim, module.memsink.general, module.memsink.sinks)
            moved = delta.abs().amax(dim=1 - dim) > 0
            assert torch.equal(moved, sink_mask(torch.tensor([42]), module.memsink.sinks, 0.3)[0]), name
