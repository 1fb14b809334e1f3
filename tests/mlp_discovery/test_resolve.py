"""What discovery found is recorded: restoring a checkpoint and patching a second model of the
same kind run no discovery forward, and a checkpoint loads by its record alone."""

import json

import pytest
import torch
from tiny_models import tiny_model

from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, get_memsink_model
from hf_memsinks.mlp_discovery import check, resolve


@pytest.fixture
def count_discovery_forwards(monkeypatch):
    """Counts the model forwards of discovery's checks (every check forward goes through
    ``check._logits``) and discovery runs themselves; starts from an empty cache."""
    counts = {"forwards": 0, "discoveries": 0}
    logits, discover = check._logits, resolve.discover_sites

    def counted_logits(*args, **kwargs):
        counts["forwards"] += 1
        return logits(*args, **kwargs)

    def counted_discover(*args, **kwargs):
        counts["discoveries"] += 1
        return discover(*args, **kwargs)

    monkeypatch.setattr(check, "_logits", counted_logits)
    monkeypatch.setattr(resolve, "discover_sites", counted_discover)
    monkeypatch.setattr(resolve, "_FOUND", {})
    return counts


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mixtral", "bitnet"])
def test_restoring_a_checkpoint_runs_no_discovery(tmp_path, model_type, count_discovery_forwards):
    model = get_memsink_model(tiny_model(model_type), MemSinkConfig(sink_fraction=0.25))
    assert count_discovery_forwards["forwards"] > 0  # the first patch of this kind discovers
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "memsink_config.json").read_text())
    assert {s["mlp"] for s in saved["found_mlps"]["specs"]} and saved["found_mlps"]["width_attrs"]
    resolve._FOUND.clear()
    count_discovery_forwards.update(forwards=0, discoveries=0)
    restored = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path).eval()
    assert count_discovery_forwards == {"forwards": 0, "discoveries": 0}
    x = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, restored(x).logits)


def test_a_second_patch_of_the_same_kind_runs_no_discovery(count_discovery_forwards):
    get_memsink_model(tiny_model("gpt2"), MemSinkConfig())
    first = dict(count_discovery_forwards)
    assert first["discoveries"] == 1 and first["forwards"] > 0
    second = get_memsink_model(tiny_model("gpt2"), MemSinkConfig())
    assert count_discovery_forwards == first
    assert [s.name for s in second.memsink.sites] == [f"transformer.h.{i}.mlp" for i in range(2)]
    get_memsink_model(tiny_model("gpt2", n_layer=3), MemSinkConfig())  # another shape: discovered anew
    assert count_discovery_forwards["discoveries"] == 2


def test_a_record_that_does_not_fit_the_model_is_refused(tmp_path):
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig())
    model.save_pretrained(tmp_path)
    path = tmp_path / "memsink_config.json"
    saved = json.loads(path.read_text())
    saved["found_mlps"]["specs"][0]["out_proj"] = "no_such_proj"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="does not match"):
        AutoMemSinkModelForCausalLM.from_pretrained(tmp_path)
