"""The benchmark's model and its training loop, through accelerate: one process, or data-parallel over N
processes (``accelerate launch --multi_gpu --num_processes N -m benchmarks.memorization run ...``), in
fp32 or under bf16 autocast (``train.precision``; accelerate's own ``--mixed_precision`` is not used).

Every process builds the same document stream and the same global batch of ``train.batch_size``
documents (padded together, Goldfish labels included), then trains on its own contiguous share of
the rows. The loss is summed over the share's target tokens and divided by the *global* batch's
target count, times the process count that DDP's gradient average divides out again: N processes
take the step that one process takes on the whole batch, up to float summation order.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hf_memsinks.data.goldfish import goldfish_labels
from hf_memsinks.data.sequence_ids import ids_for_documents, only_repeated
from hf_memsinks.evaluation.memorization import document_losses, pad_documents
from hf_memsinks.integrations.optimizer import attach_sink_lr

from .config import BenchmarkConfig, GoldfishConfig
from .pressure import add_general_dropout, add_general_weight_decay
from .sink_step import attach_sink_step


def build_model(cfg: BenchmarkConfig, vocab_size: int, max_length: int):
    """The config's model (``model.type`` gpt2, llama or gpt_neox; no dropout), randomly
    initialised from ``seed``, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if m.type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.mlp,
                                      n_positions=max_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      **common)
    else:
        config = AutoConfig.for_model(m.type, hidden_size=m.hidden, num_hidden_layers=m.layers,
                                      num_attention_heads=m.heads, intermediate_size=m.mlp,
                                      max_position_embeddings=max_length, **common)
        if m.type == "llama":
            config.num_key_value_heads = m.heads
            config.tie_word_embeddings = True
        else:
            config.hidden_dropout = config.attention_dropout = 0.0
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_accelerator(cfg: BenchmarkConfig):
    """The run's ``Accelerator`` on ``device`` ("cpu", "cuda" or "auto": cuda when available),
    with ``threads`` CPU threads when set.
    Its own mixed precision stays off: ``train`` autocasts the training forward itself (see
    ``precision``), so evaluation always runs in fp32 and runs of different precisions can share
    a process."""
    from accelerate import Accelerator

    if cfg.threads:  # (every entry point makes its accelerator first: run, sweep, scale's runs)
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda, but torch finds no CUDA device (use device: auto or cpu)")
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, mixed_precision="no")


def precision(cfg: BenchmarkConfig, device: torch.device) -> str:
    """``train.precision`` resolved on ``device``: "auto" is "bf16" on a CUDA device that has it,
    else "fp32"."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def warmup_cosine(steps: int, warmup: int, floor: float) -> Callable[[int], float]:
    """Learning-rate factor at step ``s``: linear warmup over ``warmup`` steps, then cosine decay
    from 1 to ``floor`` at ``steps``."""

    def factor(s: int) -> float:
        ramp = min(1.0, (s + 1) / max(1, warmup))
        return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))

    return factor


def optimizer(model, t) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9, 0.95; no weight decay on biases and norms) and its ``warmup_cosine``
    schedule, for the ``TrainConfig`` ``t``."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(t.steps, t.warmup, t.min_lr_ratio))


def global_batches(stream: list[list[int]], batch_size: int, pad_id: int, with_ids: bool | Sequence[int],
                   goldfish: GoldfishConfig | None = None) -> Iterator[dict]:
    """The stream cut into padded batches of ``batch_size`` documents, in order (a short tail is
    dropped): ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding and on Goldfish's
    dropped targets) and, ``with_ids``, each document's ``sequence_ids``: its content ID, or the
    ID ``with_ids`` gives its position in the stream."""
    for start in range(0, len(stream) - batch_size + 1, batch_size):
        docs = stream[start:start + batch_size]
        tokens, mask = pad_documents(docs, pad_id)
        labels = tokens.masked_fill(~mask, -100)
        if goldfish:
            labels = goldfish_labels(tokens, labels, goldfish.k, goldfish.h, hash=goldfish.hash, seed=goldfish.seed,
                                     attention_mask=mask)
        batch = {"input_ids": tokens, "attention_mask": mask.long(), "labels": labels}
        if isinstance(with_ids, bool):
            if with_ids:
                batch["sequence_ids"] = ids_for_documents(docs)
        else:
            batch["sequence_ids"] = torch.tensor(with_ids[start:start + batch_size], dtype=torch.long)
        yield batch


def share(batch: dict, rank: int, processes: int) -> dict:
    """This process's contiguous rows of a global batch."""
    rows = batch["input_ids"].shape[0]
    if rows % processes:
        raise ValueError(f"train.batch_size {rows} does not split evenly over {processes} processes: "
                         f"set it to a multiple of {processes}")
    n = rows // processes
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy summed over the batch's target tokens (labels != -100)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def curve_point(model, setting, step: int, n: int) -> dict:
    """Mean loss on the first ``n`` repeated, control and validation documents."""
    pad = setting.pad_id
    losses = {name: document_losses(model, docs[:n], pad_id=pad).mean().item()
              for name, docs in (("repeated_loss", setting.repeated), ("control_loss", setting.control),
                                 ("val_loss", setting.validation))}
    return {"step": step, **losses}


def train(model, setting, stream: list[list[int]], cfg: BenchmarkConfig, *, with_ids: bool | Sequence[int], label: str,
          goldfish: GoldfishConfig | None = None, accelerator=None,
          on_optimizer: Callable | None = None, progress=None, route: Callable | None = None,
          loss: Callable | None = None) -> tuple[list[dict], dict]:
    """AdamW with warmup and cosine decay (``warmup_cosine``), on this process's share of every
    global batch; ``model`` is trained in place. Returns the loss curve (eval mode: sinks dropped)
    and the shares: documents and target tokens each process trained on.

    Args:
        model: a causal LM, patched or not, already on the accelerator's device.
        stream: the documents in training order (the same on every process).
        with_ids: pass each document's sequence ID (memsinks runs): True for its content ID, or
            one ID per position of ``stream``. Under ``general_sightings=0`` or ``train.repeated_only_ids``
            an ID that occurs once in the stream becomes -1, as ``add_sequence_ids(..., repeated_only=True)``
            gives them.
        goldfish: train with the Goldfish loss of these settings.
        accelerator: the run's ``Accelerator`` (default: ``make_accelerator(cfg)``).
        on_optimizer: called with the optimizer once it exists (to attach hooks to it).
        progress: report the steps to this (progress.py: the benchmark's one display)
            instead of drawing a bar of its own.
        route: ``route(model, global_batch)`` gives the batch's sequence IDs at each step (gate.py).
        loss: ``loss(model, batch)`` replaces ``loss_sum`` (the same sum over target tokens; decay.py).
    """
    accelerator = accelerator or make_accelerator(cfg)
    rank, processes = accelerator.process_index, accelerator.num_processes
    loss_of = loss or loss_sum
    bf16 = precision(cfg, accelerator.device) == "bf16"
    t = cfg.train
    steps, every = t.steps, t.eval_every
    opt, schedule = optimizer(model, t)
    attach_sink_lr(model, opt)  # (the config's sink_lr_scale; nothing for a plain model or a scale of 1)
    if getattr(model, "memsink", None) is not None:
        if t.general_weight_decay:
            add_general_weight_decay(model, opt, t.general_weight_decay)
        if t.general_dropout:
            add_general_dropout(model, t.general_dropout, cfg.seed)
        if t.sink_optimizer != "adam":
            attach_sink_step(model, opt, t.sink_optimizer)
    if on_optimizer is not None:
        on_optimizer(opt)
    if with_ids is not False and getattr(model, "memsink", None) is not None and (
            model.memsink.config.general_sightings == 0 or t.repeated_only_ids):  # (an ID seen once: -1)
        with_ids = only_repeated(ids_for_documents(stream) if with_ids is True else torch.tensor(with_ids)).tolist()
    curve = [curve_point(model, setting, 0, t.curve_docs)]
    wrapped, prepared_opt = accelerator.prepare(model, opt)
    wrapped.train()
    counts = torch.zeros(2, dtype=torch.long)  # this process's documents, target tokens
    batches = global_batches(stream, t.batch_size, setting.pad_id, with_ids, goldfish)
    if progress is not None and accelerator.is_main_process:
        progress.start(label, steps)
        report, bar = progress, None
    else:
        report, bar = None, tqdm(total=steps, desc=label, mininterval=2.0, dynamic_ncols=True,
                                 disable=not accelerator.is_main_process)
    for step, batch in enumerate(batches, 1):
        if route is not None:
            batch["sequence_ids"] = route(model, batch)
        targets = int((batch["labels"][:, 1:] != -100).sum().clamp(min=1))  # on the host: no device sync
        part = share(batch, rank, processes)
        counts += torch.tensor([part["input_ids"].shape[0], int((part["labels"][:, 1:] != -100).sum())])
        mine = {k: v.to(accelerator.device, non_blocking=True) for k, v in part.items()}
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(wrapped, mine) * (processes / targets)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(wrapped.parameters(), 1.0)
        prepared_opt.step()
        schedule.step()
        prepared_opt.zero_grad(set_to_none=True)
        shown = loss.item() if step % 50 == 0 else None  # (about the batch's mean loss)
        if report is not None:
            report.advance(label, 1, shown)
        else:
            bar.update(1)
            if shown is not None:
                bar.set_postfix(loss=f"{shown:.3f}")
        if step % every == 0 or step == steps:
            curve.append(curve_point(model, setting, step, t.curve_docs))
            wrapped.train()
        if step >= steps:
            break
    if report is not None:
        report.end(label)
    else:
        bar.close()
    model.eval()
    shares = accelerator.gather(counts.to(accelerator.device)).reshape(processes, 2).cpu()
    accelerator.free_memory()
    return curve, {"documents": shares[:, 0].tolist(), "tokens": shares[:, 1].tolist()}


def finish_processes() -> None:
    """End a multi-process run cleanly: every process waits, the process group closes, and the
    interpreter exits at once (gloo can abort in its teardown after a clean run). No-op in a
    single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
