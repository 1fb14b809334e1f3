"""Attribution by component swaps (benchmarks/memorization/attribution.py): components found from structure
partition the parameters, a swap of every component is the other model, and the command runs."""

import json

import pytest
import torch
from tiny_models import batch, tiny_model

from benchmarks.memorization.attribution import EMBEDDINGS, attribute, components, hybrid
from benchmarks.memorization.config import load_config
from hf_memsinks import MemSinkConfig, get_memsink_model


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_components_partition_the_parameters(model_type):
    model = get_memsink_model(tiny_model(model_type), MemSinkConfig(sink_fraction=0.25))
    groups = components(model)
    names = [n for n, _ in model.named_parameters()]
    per_part = [n for k, g in groups.items() if not k.startswith("all ") for n in g]
    assert sorted(per_part) == sorted(names)  # each parameter in exactly one component
    assert sorted(groups["all attention"] + groups["all MLP"] + groups[EMBEDDINGS]) == sorted(names)
    for layer in (0, 1):
        assert any("proj" in n or "fc" in n or "dense" in n for n in groups[f"L{layer} MLP"])
        assert any("attn" in n or "attention" in n for n in groups[f"L{layer} attention"])
    assert any("emb" in n or "wte" in n for n in groups[EMBEDDINGS])


def test_swapping_every_component_gives_the_other_model():
    a, b = tiny_model("gpt2", seed=0).eval(), tiny_model("gpt2", seed=1).eval()
    patched = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sink_fraction=0.25))
    groups = components(patched)
    x = batch()
    everything = groups["all attention"] + groups["all MLP"] + groups[EMBEDDINGS]
    assert torch.equal(hybrid(a, b, everything)(x).logits, b(x).logits)
    assert torch.equal(hybrid(a, b, [])(x).logits, a(x).logits)
    one = hybrid(a, b, groups["L0 MLP"])
    assert not torch.equal(one(x).logits, a(x).logits) and not torch.equal(one(x).logits, b(x).logits)


def test_attribute_end_to_end(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["threads=1", "model.layers=2"])
    report = attribute(cfg, tmp_path)
    assert set(report["components"]) == {"L0 attention", "L0 MLP", "L1 attention", "L1 MLP", EMBEDDINGS,
                                         "all attention", "all MLP"}
    saved = json.loads((tmp_path / "attribution.json").read_text())
    assert saved["M"]["canary_gap"] == pytest.approx(report["M"]["canary_gap"])
    assert "| L1 MLP |" in (tmp_path / "attribution.md").read_text()
