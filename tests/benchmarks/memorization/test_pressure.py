"""General-neuron pressure for the what-was-tried table (benchmarks/memorization/pressure.py): dropout on the
general neurons' activations only, in training only; extra weight decay on general weights only."""

import copy

import torch
from tiny_models import batch, tiny_model

from benchmarks.memorization.pressure import add_general_dropout, add_general_weight_decay
from hf_memsinks import MemSinkConfig, get_memsink_model

CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.5, sink_lr_scale=1.0)
IDS = torch.tensor([5, 6, 7])


def out_inputs(model):
    seen = []
    proj = model.transformer.h[0].mlp.c_proj
    proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()), prepend=False)
    return proj, seen


def test_general_dropout_drops_general_neurons_in_training_only():
    model = get_memsink_model(tiny_model("gpt2"), CFG)
    plain = copy.deepcopy(model)
    add_general_dropout(model, 0.25, seed=0)
    proj, seen = out_inputs(model)
    _, want = out_inputs(plain)
    x = batch(3, 32)
    for m in (model.train(), plain.train()):
        m(input_ids=x, sequence_ids=IDS)
    general = proj.memsink.general
    got, ref = seen[0][..., :general], want[0][..., :general]
    dropped = (got == 0) & (ref != 0)
    assert 0.2 < dropped.float().mean().item() < 0.3
    assert torch.allclose(got[~dropped], ref[~dropped] / 0.75)
    assert torch.equal(seen[0][..., general:], want[0][..., general:])  # sinks untouched
    seen.clear(), want.clear()
    for m in (model.eval(), plain.eval()):
        m(input_ids=x)
    assert torch.equal(seen[0], want[0])


def test_general_weight_decay_shrinks_only_general_weights():
    steps = {}
    for decay in (0.0, 2.0):
        model = get_memsink_model(tiny_model("gpt2"), CFG).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if decay:
            add_general_weight_decay(model, opt, decay)
        proj = model.transformer.h[0].mlp.c_fc
        before = [t.clone() for t in proj.general_and_sink_parts()["weight"]]
        x = batch(2, 8)
        model(input_ids=x, labels=x, sequence_ids=IDS[:2]).loss.backward()
        opt.step()
        steps[decay] = (before, [t.clone() for t in proj.general_and_sink_parts()["weight"]])
    (before, plain), (_, decayed) = steps[0.0], steps[2.0]
    assert torch.allclose(decayed[0], plain[0] * (1 - 0.1 * 2.0), atol=1e-7)
    assert torch.equal(decayed[1], plain[1])
    assert not torch.equal(before[0], plain[0])
