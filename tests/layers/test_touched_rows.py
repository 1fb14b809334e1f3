"""Gradients of the touched sink rows only (layers/touched_rows.py): under ``sink_optimizer="rowwise"``
a sink parameter's ``.grad`` holds the rows its gathered projections computed, and the rule steps
those, to the same parameters as with the dense gradient, through gradient accumulation, gradient
clipping (torch's and accelerate's way), ``zero_grad`` either way and a dense-path call in the same
step, and in a ``Trainer`` run; where the dense gradient is needed (fp16 autocast,
``torch.autograd.grad``) it is made."""

import copy

import pytest
import torch
from datasets import Dataset
from tiny_models import batch, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_memsinks import MemSinkConfig, MemSinkDataCollator, attach_sink_lr, get_memsink_model
from hf_memsinks.layers import touched_rows
from hf_memsinks.layers.projections import is_patched_projection
from hf_memsinks.layers.sink_parts import parts
from hf_memsinks.layers.touched_rows import TouchedRowsGrad

CFG = MemSinkConfig.for_finetuning(sink_fraction=0.5, sink_active_prob=0.3, sink_lr_scale=5.0,
                                   sink_optimizer="rowwise")


def patched(model_type):
    torch.manual_seed(0)
    return get_memsink_model(tiny_model(model_type), copy.deepcopy(CFG)).train()  # (a config of its own)


def optimizer(model):
    # (SGD for the general neurons: AdamW would blow float summation order up into lr-sized differences)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    attach_sink_lr(model, opt)
    return opt


def weight_parts(model):
    return [parts(m)["weight"] for m in model.modules() if is_patched_projection(m) and "weight" in parts(m)]


def backward(model, seed, ids=(3, 4)):
    torch.manual_seed(seed)  # (dropout's masks alike in the models compared)
    x = batch(2, 8, seed=seed)
    model(input_ids=x, labels=x, sequence_ids=torch.tensor(ids)).loss.backward()


def dense(model):
    """The same model's sinks stepped from a dense gradient."""
    for part in weight_parts(model):
        touched_rows.stop_keeping(part)
    return model


def clip(model, step):
    """Clip to a norm most steps exceed, as torch does (odd steps) or as accelerate and Trainer do."""
    if step % 2:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grads_with_norm_(params, 0.5, norm)
    return norm


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_touched_rows_step_the_sinks_as_the_dense_gradient_does(model_type):
    model = patched(model_type)
    other = copy.deepcopy(model)
    opt, opt_dense = optimizer(model), optimizer(other)
    dense(other)
    for step in range(4):
        for micro in range(2):  # (gradient accumulation: the rows are summed over micro-batches)
            for m in (model, other):
                backward(m, seed=10 * step + micro, ids=(3 + micro, 7 + step))
        grads = [p.grad for p in weight_parts(model)]
        assert all(isinstance(g, TouchedRowsGrad) and g.full is None for g in grads)
        assert all(0 < g.rows()[0].numel() < g.neurons for g in grads)  # (the IDs' rows only)
        assert not any(isinstance(p.grad, TouchedRowsGrad) for p in weight_parts(other))
        norms = [clip(m, step) for m in (model, other)]
        assert all(p.grad.full is None for p in weight_parts(model))  # (clipped as rows: no dense tensor made)
        torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
        assert norms[0] > 0.5  # (clipped)
        for o in (opt, opt_dense):
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(weight_parts(model), weight_parts(patched(model_type))))


def test_zero_grad_either_way_and_a_dense_path_call_in_the_same_step():
    model = patched("llama")
    other = copy.deepcopy(model)
    opt, opt_dense = optimizer(model), optimizer(other)
    dense(other)
    config = next(m for m in model.modules() if is_patched_projection(m)).memsink.state.config
    config_other = next(m for m in other.modules() if is_patched_projection(m)).memsink.state.config
    for m, o in ((model, opt), (other, opt_dense)):
        backward(m, seed=1)  # (a step the optimizer skipped, as a loss scaler does on an overflow)
        o.zero_grad(set_to_none=False)
        backward(m, seed=2)
    config.compute_active_sinks_only = config_other.compute_active_sinks_only = False  # (the dense path)
    for m, o in ((model, opt), (other, opt_dense)):
        backward(m, seed=3, ids=(5, 6))
        o.step()
    assert all(p.grad is None for p in weight_parts(model))
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_rows_never_outgrow_a_dense_gradient():
    model = patched("llama")
    optimizer(model)
    for seed in range(3):  # (micro-batches, and in each more rows than the sinks have neurons)
        x = batch(16, 8, seed=seed)
        model(input_ids=x, labels=x, sequence_ids=torch.arange(16) + 100 * seed).loss.backward()
        grads = [p.grad for p in weight_parts(model)]
        assert all(isinstance(g, TouchedRowsGrad) and g.full is None for g in grads)
        assert all(sum(i.numel() for i in g.row_index) <= g.neurons for g in grads)
    torch._foreach_zero_(grads)  # (a foreach optimizer's zero_grad(set_to_none=False))
    assert all(g.full is None and not g.row_index for g in grads)


def test_the_dense_gradient_where_a_loss_scaler_or_autograd_grad_reads_it():
    model = patched("llama")
    optimizer(model)
    with torch.autocast("cpu", dtype=torch.float16):
        backward(model, seed=1)
    assert all(p.grad is not None and not isinstance(p.grad, TouchedRowsGrad) for p in weight_parts(model))
    model = patched("llama")
    other = dense(copy.deepcopy(model))
    optimizer(model)
    got = []
    for m in (model, other):
        torch.manual_seed(4)
        x = batch(2, 8, seed=4)
        loss = m(input_ids=x, labels=x, sequence_ids=torch.tensor([3, 4])).loss
        got.append(torch.autograd.grad(loss, weight_parts(m)))
    assert all(p.grad is None for p in weight_parts(model))
    for a, b in zip(*got):
        assert type(a) is torch.Tensor
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class GradTypes(TrainerCallback):
    """The sinks' gradient types at each optimizer step (after Trainer's clipping)."""

    def __init__(self):
        self.seen = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen.append({type(p.grad).__name__ + ("" if getattr(p.grad, "full", None) is None else " made dense")
                          for p in weight_parts(model)})


def test_a_trainer_run_ends_where_the_dense_gradient_takes_it(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(3, 97, (12, 12), generator=g).tolist(),
                            "sequence_ids": [3 + i % 3 for i in range(12)]})
    runs = []
    for keep in (True, False):
        if not keep:  # (the rule steps the dense gradient)
            monkeypatch.setattr(touched_rows, "keep_touched_rows", lambda *args: None)
        model, types = patched("llama"), GradTypes()
        args = TrainingArguments(str(tmp_path / str(keep)), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-2, optim="sgd", max_grad_norm=0.5,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=MemSinkDataCollator(pad_token_id=0),
                          callbacks=[types])
        trainer.train()
        runs.append((model, [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h], types.seen))
    (kept, norms, seen), (dense_model, dense_norms, dense_seen) = runs
    assert seen == [{"TouchedRowsGrad"}] * 3 and dense_seen == [{"Tensor"}] * 3  # (Trainer clipped the rows)
    assert min(norms) > 0.5 and norms == pytest.approx(dense_norms, rel=1e-5)  # (clipped, the sinks counted)
    for (name, p), q in zip(kept.named_parameters(), dense_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("how", ["bf16 autocast", "gradient checkpointing"])
def test_autocast_and_checkpointing_keep_the_rows_and_their_values(how):
    model = patched("llama")
    other = dense(copy.deepcopy(model))
    for m in (model, other):
        optimizer(m)
        if how == "gradient checkpointing":
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bf16 autocast"):
            backward(m, seed=5)
    assert all(isinstance(p.grad, TouchedRowsGrad) for p in weight_parts(model))
    for p, q in zip(weight_parts(model), weight_parts(other)):
        torch.testing.assert_close(p.grad.dense(), q.grad, rtol=1e-5, atol=1e-6)


def test_a_hook_on_a_sink_parameter_gets_the_dense_gradient():
    model = patched("llama")
    optimizer(model)
    seen = []
    part = weight_parts(model)[0]
    part.register_hook(lambda g: seen.append(type(g)))
    backward(model, seed=1)
    assert seen == [torch.Tensor] and type(part.grad) is torch.Tensor
    assert all(isinstance(p.grad, TouchedRowsGrad) for p in weight_parts(model)[1:])
