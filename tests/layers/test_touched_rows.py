"""Gradients of the touched sink rows only (layers/touched_rows.py): in a full fine-tune with
``sink_optimizer="rowwise"`` the gathered projections keep the rows they computed and the rule steps
those, to the same parameters as with the dense gradient; a step never taken leaves nothing behind;
where the dense gradient is needed (fp16 autocast, frozen general neurons) it is still made."""

import copy

import pytest
import torch
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model
from hf_memsinks.layers import touched_rows
from hf_memsinks.layers.projections import is_patched_projection
from hf_memsinks.layers.sink_parts import parts

CFG = MemSinkConfig.for_finetuning(sink_fraction=0.5, sink_active_prob=0.3, sink_lr_scale=5.0,
                                   sink_optimizer="rowwise")


def patched(model_type):
    torch.manual_seed(0)
    return get_memsink_model(tiny_model(model_type), CFG).train()


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
    """The same model's sinks stepped from a dense gradient (the rows not kept)."""
    for part in weight_parts(model):
        touched_rows.stop_keeping(part)
    return model


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_touched_rows_step_the_sinks_as_the_dense_gradient_does(model_type):
    model = patched(model_type)
    other = copy.deepcopy(model)
    opt, opt_dense = optimizer(model), optimizer(other)
    dense(other)
    for step in range(3):
        for micro in range(2):  # (gradient accumulation: the kept rows are summed over micro-batches)
            for m in (model, other):
                backward(m, seed=10 * step + micro, ids=(3 + micro, 7 + step))
        kept = [touched_rows.kept(p) for p in weight_parts(model)]
        assert all(p.grad is None for p in weight_parts(model))
        assert all(0 < k.kept < k.rows * 2 for k in kept)  # (the IDs' rows, of 2 micro-batches)
        assert all(p.grad is not None for p in weight_parts(other))
        for o in (opt, opt_dense):
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(weight_parts(model), weight_parts(patched(model_type))))


def test_a_step_never_taken_leaves_no_rows_behind():
    model = patched("llama")
    other = copy.deepcopy(model)
    opt, opt_other = optimizer(model), optimizer(other)
    backward(model, seed=1)  # (a step the optimizer skipped, as a loss scaler does on an overflow)
    model.zero_grad()
    for m, o in ((model, opt), (other, opt_other)):
        backward(m, seed=2)
        o.step()
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_kept_rows_never_outgrow_a_dense_gradient():
    model = patched("llama")
    optimizer(model)
    for seed in range(12):
        backward(model, seed=seed, ids=(seed, seed + 100))
    assert all(k.kept <= k.rows for k in map(touched_rows.kept, weight_parts(model)))


def test_the_dense_gradient_where_a_loss_scaler_or_an_adapter_reads_it():
    model = patched("llama")
    optimizer(model)
    with torch.autocast("cpu", dtype=torch.float16):
        backward(model, seed=1)
    assert all(p.grad is not None for p in weight_parts(model))
    model = patched("llama")
    for name, p in model.named_parameters():
        p.requires_grad_(".sink_part_" in name)  # (general neurons frozen)
    optimizer(model)
    backward(model, seed=1)
    assert all(p.grad is not None for p in weight_parts(model))
    assert all(touched_rows.kept(p) is None for p in weight_parts(model))
