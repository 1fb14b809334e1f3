"""Every architecture of tiny_models.MODEL_TYPES: patch, train step, exact removal, add mode."""

import copy

import pytest
import torch
from tiny_models import MODEL_TYPES, batch, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model
from hf_memsinks.mlp_discovery.resolve import mlp_sites


def mlp_widths(model):
    return [s.width for s in mlp_sites(model)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_split_patch_train_and_exact_removal(model_type):
    model = tiny_model(model_type)
    base_class = type(model)
    width = mlp_widths(model)[0]
    patched = get_memsink_model(model, MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.5))
    assert patched is model and isinstance(patched, base_class)
    general = width - round(width * 0.25)

    x = batch()
    patched.train()
    for ids in (torch.tensor([5, 6, 7]), torch.arange(36).reshape(3, 12) // 5):
        out = patched(input_ids=x, labels=x, sequence_ids=ids)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in patched.parameters())
    patched.zero_grad()

    patched.eval()
    with torch.no_grad():
        expected = patched(input_ids=x).logits
    plain = patched.remove_sinks()
    assert type(plain) is base_class
    assert not any("sink" in k for k in plain.state_dict())
    assert not any("memsink" in k or "sink" in k for k in plain.config.to_dict())
    widths = mlp_widths(plain)
    if model_type in ("bloom", "mpt"):
        assert widths == [width, width]  # hard-coded width: sinks zero-padded
    else:
        assert widths == [general, general]
    with torch.no_grad():
        got = plain(input_ids=x).logits
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_add_mode_starts_unchanged_and_removes_to_original_width(model_type):
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    width = mlp_widths(model)[0]
    x = batch()
    with torch.no_grad():
        before = original(input_ids=x).logits
    patched = get_memsink_model(model, MemSinkConfig(mode="add", sink_fraction=0.2, sink_active_prob=0.5))
    patched.train()  # every sink active for some IDs: still unchanged (zero output weights)
    with torch.no_grad():
        during = patched(input_ids=x, sequence_ids=torch.tensor([1, 2, 3])).logits
    assert (during - before).abs().max().item() < 1e-5
    plain = patched.eval().remove_sinks()
    assert mlp_widths(plain) == [width, width]
    with torch.no_grad():
        after = plain(input_ids=x).logits
    assert (after - before).abs().max().item() < 1e-5


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_per_layer_sink_fractions_give_each_layer_its_width(model_type):
    """layers={0: 2/3, -1: 0.5} on a 2-layer model: the first MLP gets twice its width in sinks, the
    last as many as it has; a training step moves both layers' sinks; removal restores the model."""
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    width = mlp_widths(model)[0]
    patched = get_memsink_model(model, MemSinkConfig.for_finetuning(layers={0: 2 / 3, -1: 0.5}))
    assert mlp_widths(patched) == [3 * width, 2 * width]
    patched.train()
    x = batch()
    patched(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2, 3])).loss.backward()
    moved = [name for name, p in patched.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert {n.split(".mlp")[0] for n in moved if ".mlp" in n} == {n.split(".mlp")[0] for n, _ in
                                                                  patched.named_parameters() if ".mlp" in n}
    plain = patched.eval().remove_sinks()
    assert mlp_widths(plain) == [width, width]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=x).logits, original(input_ids=x).logits)
    with pytest.raises(ValueError, match="names one of this model's 2 layers twice"):  # 0 and -2 are one layer
        get_memsink_model(tiny_model(model_type), MemSinkConfig.for_finetuning(layers={0: 0.5, -2: 0.2}))
