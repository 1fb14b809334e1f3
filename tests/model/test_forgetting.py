"""Forgetting chosen documents: forget_sinks deletes exactly the union of the IDs' sinks (gpt2's
Conv1D and llama's gate/up), a forgotten ID in "activate" mode is the general-only model, other
IDs keep their unshared sinks, coverage is 1 - (1 - p)^n, and high coverage warns."""

import copy
import warnings

import pytest
import torch
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask
from hf_memsinks.model.forgetting import COVERAGE_WARNING, expected_coverage, sink_coverage


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_forget_sinks_deletes_exactly_the_ids_sinks(model_type):
    from hf_memsinks.layers.projections import is_patched_projection

    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.1)
    model = get_memsink_model(tiny_model(model_type), cfg).eval()
    projections = {n: m for n, m in model.named_modules() if is_patched_projection(m)}
    before = {n: m.general_and_sink_parts() for n, m in projections.items()}
    forget = torch.tensor([101, 202])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2 IDs at p = 0.1: no warning
        coverage = model.forget_sinks(forget)
    union = sink_mask(forget, model.memsink.sites[0].sinks, 0.1).any(0)
    assert union.any() and not union.all()
    assert coverage == pytest.approx(union.float().mean().item())
    for name, module in projections.items():
        for param, dim in module.neuron_dims().items():
            general, sinks = module.general_and_sink_parts()[param]
            old_general, old_sinks = before[name][param]
            assert torch.equal(general, old_general), (name, param)
            gone = union.repeat(sinks.shape[dim] // union.numel())  # fused gate_up: one block per chunk
            assert torch.all(sinks.index_select(dim, gone.nonzero().squeeze(1)) == 0), (name, param)
            keep = (~gone).nonzero().squeeze(1)
            assert torch.equal(sinks.index_select(dim, keep), old_sinks.index_select(dim, keep)), (name, param)


def test_forgotten_id_serves_the_general_model_and_others_keep_their_sinks():
    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.1)
    model = get_memsink_model(tiny_model("llama"), cfg).eval()
    s = model.memsink.sites[0].sinks
    masks = sink_mask(torch.arange(1, 200), s, 0.1)
    forget = 1 + next(i for i in range(199) if masks[i].any())
    disjoint = 1 + next(i for i in range(199) if masks[i].any() and not (masks[i] & masks[forget - 1]).any())
    shared = 1 + next(i for i in range(199) if i != forget - 1 and (masks[i] & masks[forget - 1]).any())
    x = batch(1)
    with model.sink_mode("activate"):
        before = {i: logits(model, x, sequence_ids=torch.tensor([i])) for i in (disjoint, shared)}
    general_only = logits(model, x)  # "drop" with eval_scaling "none": sinks off, general x1
    model.forget_sinks([forget])
    with model.sink_mode("activate"):
        assert torch.allclose(logits(model, x, sequence_ids=torch.tensor([forget])), general_only, atol=1e-6)
        assert torch.equal(logits(model, x, sequence_ids=torch.tensor([disjoint])), before[disjoint])
        assert not torch.allclose(logits(model, x, sequence_ids=torch.tensor([shared])), before[shared])


def test_coverage_and_warning():
    assert expected_coverage(16, 0.3) == pytest.approx(1 - 0.7**16)
    assert expected_coverage(1, 0.05) == pytest.approx(0.05)
    cfg = MemSinkConfig(mode="add", sink_active_prob=0.3, num_sink_neurons=512)
    model = get_memsink_model(tiny_model("gpt2"), cfg)
    ids = list(range(1000, 1016))
    assert sink_coverage(model, ids) == pytest.approx(expected_coverage(16, 0.3), abs=0.01)
    assert sink_coverage(model, ids) > COVERAGE_WARNING
    with pytest.warns(UserWarning, match="little more targeted than remove_sinks"):
        copy.deepcopy(model).remove_sinks(forget_ids=ids)
    with pytest.warns(UserWarning, match="1 - \\(1 - p\\)\\^n"):
        copy.deepcopy(model).forget_sinks(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy.deepcopy(model).remove_sinks(forget_ids=[1000])  # 30%: no warning
    with pytest.raises(ValueError, match="no sequence IDs"):
        model.forget_sinks([])
