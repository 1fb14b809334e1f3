"""One rank of the two-process tests (launched by tests/test_distributed.py, never collected).

usage: ddp_worker.py OUT_DIR {accelerate,trainer,fsdp} [--checkpointing] [--sightings]

Each rank trains a tiny patched model on its own shard of a dataset with many IDs, then writes
its final weights, the masks it built for a fixed list of IDs, and which sinks moved.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny_model  # noqa: E402

from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model, sink_mask  # noqa: E402
from hf_memsinks.data import MemSinkDataCollator  # noqa: E402

PROBE_IDS = torch.tensor([0, 1, 2, 3, 12345, 2**62 + 7])


def dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    n = 32
    # ID -1 rows train general neurons only: some batches activate no sink at all
    ids = [int(i) for i in torch.randint(0, 6, (n,), generator=g)]
    ids = [-1 if i == 0 else i for i in ids]
    return Dataset.from_dict({"input_ids": torch.randint(3, 97, (n, 12), generator=g).tolist(), "sequence_ids": ids})


def with_accelerate(model, checkpointing):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    loader = DataLoader(dataset(), batch_size=4, shuffle=True, collate_fn=MemSinkDataCollator(pad_token_id=0),
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    assert attach_sink_lr(model, opt) is not None  # through the DDP and accelerate wrappers
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model), accelerator.process_index, accelerator.num_processes


def with_fsdp(model, out):
    """FSDP2 (``fully_shard``, gloo, CPU) with each decoder block one unit, then the sink-free export
    from a full state dict gathered on rank 0. (accelerate only enables FSDP on accelerators, so on
    CPU this calls torch's FSDP2 directly; configs/accelerate_fsdp.yaml sets up the same on GPUs.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, DistributedSampler

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    assert isinstance(model.transformer.h[0].mlp.c_fc.weight, DTensor), "parameters are not sharded"
    model.train()
    data = dataset()
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, world, rank, shuffle=True, seed=0),
                        collate_fn=MemSinkDataCollator(pad_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = None
    if rank == 0:
        full = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3))
        full.load_state_dict(state)
        torch.save(full.sink_parameters(), os.path.join(out, "sinks.pt"))
        full.remove_sinks().save_pretrained(os.path.join(out, "clean"))
    dist.barrier()
    return full, rank, world


def with_trainer(model, checkpointing, out, check=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                             activation_checkpointing=checkpointing)
    collator = MemSinkDataCollator(pad_token_id=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collator)
    trainer.train()
    if check is not None:
        check(trainer)
    return trainer.model, trainer.args.process_index, trainer.args.world_size


def lora_with_rowwise_sinks(model):
    """LoRA on attention, the sinks trained beside it by sink_optimizer="rowwise"."""
    from peft import LoraConfig, get_peft_model

    from hf_memsinks import train_sinks

    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    train_sinks(model)
    return model


def rowwise_state(trainer, found: dict) -> None:
    """Whether the rule stepped every sink parameter and the optimizer kept no moments for them."""
    sinks = [p for n, p in trainer.model.named_parameters() if "sink_part_" in n]
    states = [trainer.optimizer.state.get(p, {}) for p in sinks]
    found["rowwise"] = bool(sinks) and all("rowwise_sq" in s and "exp_avg" not in s for s in states)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("how", choices=["accelerate", "trainer", "fsdp"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--sightings", action="store_true", help="MemSinkConfig(general_sightings=1)")
    parser.add_argument("--later-sinks", action="store_true", help="MemSinkConfig(sinks_from_sighting=2)")
    parser.add_argument("--lora-rowwise", action="store_true",
                        help="LoRA, the sinks beside it under sink_optimizer='rowwise' (Trainer only)")
    a = parser.parse_args()
    torch.manual_seed(0)
    config = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3, general_sightings=1 if a.sightings else None,
                           sink_optimizer="rowwise" if a.lora_rowwise else "adamw",
                           sinks_from_sighting=2 if a.later_sinks else 1)
    model = get_memsink_model(tiny_model("gpt2"), config)
    found = {}
    if a.lora_rowwise:
        model = lora_with_rowwise_sinks(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if a.how == "accelerate":
        model, rank, world = with_accelerate(model, a.checkpointing)
    elif a.how == "fsdp":
        model, rank, world = with_fsdp(model, a.out)
    else:
        model, rank, world = with_trainer(model, a.checkpointing, a.out,
                                          (lambda t: rowwise_state(t, found)) if a.lora_rowwise else None)
    model = getattr(model, "module", model)
    if model is None:  # FSDP: only rank 0 holds the full weights
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)
    memsink = getattr(model.get_base_model() if a.lora_rowwise else model, "memsink", None)
    routing = getattr(memsink, "routing", None)  # (FSDP's rank 0: the full model)
    torch.save({"world": world, "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "initial": initial, "masks": sink_mask(PROBE_IDS, 32, 0.3),
                "sightings": routing.sightings.state_dict() if routing else None, **found},
               os.path.join(a.out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo sometimes aborts in its destructors at interpreter exit


if __name__ == "__main__":
    main()
