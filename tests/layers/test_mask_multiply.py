"""The sink multiply's backward: one bool->float conversion of a call's mask for all its layers,
nothing held between forward and backward, gradients bit-identical to converting per layer."""

import dataclasses

import pytest
import torch
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, PaperReference, get_memsink_model
from hf_memsinks.layers import mask_multiply
from hf_memsinks.layers.state import SinkState

CFG = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4)
PER_TOKEN = torch.tensor([[1] * 6 + [2] * 6, [3] * 12, [4] * 4 + [-1] * 8])


def grads(model_type, monkeypatch, shared: bool, per_layer_masks=False):
    cfg = dataclasses.replace(CFG, reference=PaperReference(per_layer_masks=per_layer_masks))
    model = get_memsink_model(tiny_model(model_type), cfg).train()
    if not shared:
        monkeypatch.setattr(SinkState, "backward_factors", lambda *a: None)
    made, seen = [], []
    original_init, original_get = mask_multiply.BackwardFactors.__init__, mask_multiply.BackwardFactors.get

    def init(self):
        original_init(self)
        made.append(self)

    def get(self, keep, dtype):
        seen.append(dtype in self.factors)  # True: reused, False: converted here
        return original_get(self, keep, dtype)

    monkeypatch.setattr(mask_multiply.BackwardFactors, "__init__", init)
    monkeypatch.setattr(mask_multiply.BackwardFactors, "get", get)
    x = batch()
    loss = model(input_ids=x, labels=x, sequence_ids=PER_TOKEN).loss
    held = [dict(f.factors) for f in made]
    loss.backward()
    monkeypatch.undo()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, made, held, seen


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_backward_converts_once_per_call_and_keeps_nothing_between_forward_and_backward(model_type, monkeypatch):
    reference, made, _, _ = grads(model_type, monkeypatch, shared=False)
    assert made == []
    shared, made, held, seen = grads(model_type, monkeypatch, shared=True)
    assert len(made) == 1 and held == [{}]  # one per call; empty when forward ends
    assert seen == [False, True]  # two layers: the last converts, the first reuses
    assert made[0].factors == {}  # dropped when the first layer's backward is done
    assert reference.keys() == shared.keys()
    for name in reference:
        assert torch.equal(reference[name], shared[name]), name


def test_per_layer_masks_get_one_shared_copy_each(monkeypatch):
    reference, _, _, _ = grads("gpt2", monkeypatch, shared=False, per_layer_masks=True)
    shared, made, _, seen = grads("gpt2", monkeypatch, shared=True, per_layer_masks=True)
    assert len(made) == 2 and seen == [False, False]
    for name in reference:
        assert torch.equal(reference[name], shared[name]), name
