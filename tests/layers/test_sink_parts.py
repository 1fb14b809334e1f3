"""Sinks stored apart from frozen general neurons (train_sinks, layers/sink_parts.py): the same
training as a trainable weight with its general gradient zeroed, at the sinks' size only and with no
frozen copy of them, and every read of the weights (state dict, removal, forgetting, the optimizer
hooks) sees the sinks in their parameters."""

import pytest
import torch
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model, train_sinks
from hf_memsinks.integrations.peft import _general_grad_hook
from hf_memsinks.layers.projections import is_patched_projection
from hf_memsinks.layers.sink_parts import parts, whole

CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.5, sink_lr_scale=3.0)
IDS = torch.tensor([5, 6, 7])


def frozen(model_type, cfg=CFG):
    model = get_memsink_model(tiny_model(model_type), cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def with_weight_hook(model):
    """What train_sinks did before storing the sinks apart: the whole weight trainable, its general gradient zeroed."""
    for module in model.modules():
        if is_patched_projection(module):
            for name, dim in module.neuron_dims().items():
                getattr(module, name).requires_grad_(True)
                getattr(module, name).register_hook(_general_grad_hook(module.memsink.general_spans, dim))
    return model


def train(model, steps=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    attach_sink_lr(model, opt)
    model.train()
    for step in range(steps):
        x = batch(3, 10, seed=step)
        model(input_ids=x, labels=x, sequence_ids=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def weights(model):
    return {n: whole(m, name).detach().clone() for n, m in model.named_modules() if is_patched_projection(m)
            for name in m.neuron_dims()}


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi3"])
def test_sinks_apart_train_as_a_trainable_weight_would(model_type):
    a, b = frozen(model_type), frozen(model_type)
    names = train_sinks(a)
    assert names and all(".sink_part_" in n for n in names)
    for m in a.modules():  # no frozen copy of the sinks: the module holds each weight once
        if is_patched_projection(m) and m.memsink.role != "norm":
            assert sum(p.numel() for p in m.parameters(recurse=False)) == sum(
                whole(m, n).numel() for n in m.neuron_dims()) + (0 if "bias" in m.neuron_dims() or m.bias is None
                                                                 else m.bias.numel())
    with_weight_hook(b)
    before = weights(a)
    train(a), train(b)
    after_a, after_b = weights(a), weights(b)
    moved = 0
    for key in after_a:
        torch.testing.assert_close(after_a[key], after_b[key], atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(after_a[key], before[key]))
    assert moved > 0
    for module in a.modules():  # the frozen weights themselves never move
        if is_patched_projection(module):
            assert not module.weight.requires_grad
    x = batch(2, 9, seed=11)
    a.eval(), b.eval()
    with torch.no_grad(), a.sink_mode("activate", [5, 6]), b.sink_mode("activate", [5, 6]):
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # removal joins the sinks back: the same plain model
        torch.testing.assert_close(a.remove_sinks()(input_ids=x).logits, b.remove_sinks()(input_ids=x).logits,
                                   atol=1e-5, rtol=1e-5)


def test_state_dict_carries_the_sinks_apart_and_loads_back():
    model = frozen("llama")
    train_sinks(model)
    train(model)
    state = model.state_dict()
    assert not any(".sink_part_" in k for k in state)
    for n, m in model.named_modules():
        if is_patched_projection(m) and m.memsink.role == "out":
            assert torch.equal(state[f"{n}.sink_weight"], m.general_and_sink_parts()["weight"][1])
    fresh = get_memsink_model(tiny_model("llama", seed=3), CFG)
    assert fresh.load_state_dict(state).missing_keys == []
    x = batch(2, 9, seed=12)
    with torch.no_grad(), model.eval().sink_mode("activate", [5, 6]), fresh.eval().sink_mode("activate", [5, 6]):
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=1e-6)
    # loading into the model whose sinks are apart: each part into its own parameter, the same objects
    own = {id(p) for p in model.parameters()}
    loaded = fresh.state_dict()
    model.load_state_dict(loaded)
    assert {id(p) for p in model.parameters()} == own
    for n, m in model.named_modules():
        if is_patched_projection(m):
            assert torch.equal(m.weight, loaded[f"{n}.weight"])
            assert torch.equal(parts(m)["weight"], loaded[f"{n}.sink_weight"])
    with torch.no_grad(), model.sink_mode("activate", [5, 6]), fresh.sink_mode("activate", [5, 6]):
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=1e-6)


def test_sink_lr_and_forgetting_reach_the_sinks_apart():
    model = frozen("gpt2")
    train_sinks(model)
    start = [d.detach().clone() for m in model.modules() if is_patched_projection(m) for d in parts(m).values()]
    hooked = train(model, steps=1)
    changed = [d.detach() - s for d, s in zip(
        [d for m in hooked.modules() if is_patched_projection(m) for d in parts(m).values()], start)]
    assert any(float(d.abs().max()) > 0 for d in changed)
    # x3 step: the same run at sink_lr_scale 1 moves the sinks a third as far (SGD, one step)
    slow = frozen("gpt2", MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.5, sink_lr_scale=1.0))
    train_sinks(slow)
    train(slow, steps=1)
    slow_moves = [d.detach() - s for d, s in zip(
        [d for m in slow.modules() if is_patched_projection(m) for d in parts(m).values()], start)]
    for fast, one in zip(changed, slow_moves):
        torch.testing.assert_close(fast, 3 * one, atol=1e-7, rtol=1e-5)
    model.forget_sinks([5, 6, 7])
    from hf_memsinks.model.forgetting import forgotten_sinks

    for site in model.memsink.sites:
        gone = forgotten_sinks(model, site, torch.tensor([5, 6, 7]))
        out = site.out_proj
        sinks = out.general_and_sink_parts()["weight"][1]  # Conv1D: (sinks, hidden)
        assert float(sinks[gone].abs().max()) == 0
        assert bool((~gone).any()) and float(sinks[~gone].abs().max()) > 0  # only those
        assert float(parts(out)["weight"].detach()[gone].abs().max()) == 0  # (zeroed in the part itself)


def test_a_training_call_without_sinks_keeps_them_in_the_graph_under_a_process_group(monkeypatch):
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter each step: a
    call that skips the sinks gives the sinks stored apart a zero one, as the whole weight would get."""
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig.for_finetuning(
        sink_optimizer="rowwise", require_sequence_ids=False)).train()
    sinks = [p for n, p in model.named_parameters() if ".sink_part_" in n]
    x = batch(2, 9, seed=2)
    model(input_ids=x, labels=x).loss.backward()  # (no process group: nothing added)
    assert all(p.grad is None for p in sinks)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in sinks)
