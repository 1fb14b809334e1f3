"""One SGD step with a single sequence ID moves only that ID's sinks (and every general neuron)."""

import pytest
import torch
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask
from hf_memsinks.layers.neurons import neuron_dim


def snapshot(model):
    return {name: {p: (g.clone(), s.clone()) for p, (g, s) in m.general_and_sink_parts().items()}
            for name, m in model.named_modules() if hasattr(m, "general_and_sink_parts")}


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_sgd_step_with_one_id_changes_only_its_sinks(model_type):
    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
    model = get_memsink_model(tiny_model(model_type), cfg).train()
    before = snapshot(model)
    seq_id = 42
    x = batch(size=4, length=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.0)
    loss = model(input_ids=x, labels=x, sequence_ids=torch.full((4,), seq_id)).loss
    loss.backward()
    opt.step()

    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "general_and_sink_parts"):
            continue
        active = sink_mask(torch.tensor([seq_id]), module.memsink.sinks, cfg.sink_active_prob)[0]
        assert 0 < active.sum() < module.memsink.sinks
        for param, (g, s) in module.general_and_sink_parts().items():
            g0, s0 = before[name][param]
            dim = 0 if param == "bias" else neuron_dim(module, module.memsink.role)
            chunks = module.memsink.chunks if module.memsink.role == "in" else 1
            ds = (s - s0).movedim(dim, 0).reshape(chunks, module.memsink.sinks, -1).abs().amax(dim=(0, 2))
            dg = (g - g0).movedim(dim, 0).reshape(chunks, module.memsink.general, -1).abs().amax(dim=(0, 2))
            assert (ds[~active] == 0).all(), f"{name}.{param}: an inactive sink moved"
            assert (ds[active] > 0).all(), f"{name}.{param}: an active sink did not move"
            assert (dg > 0).all(), f"{name}.{param}: a general neuron did not move"
            checked += 1
    assert checked >= 4
