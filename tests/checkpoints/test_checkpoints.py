"""remove_sinks exports and memsink checkpoints: exact, safe by default, restorable."""

import copy
import dataclasses
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import batch, tiny_model
from transformers import AutoModelForCausalLM

from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, PaperReference, get_memsink_model, remove_sinks

CFG = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4, reference=PaperReference(eval_scaling="paper"),
                    mode="split")


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def trained(model_type="gpt2", cfg=CFG, steps=3):
    """A patched model after a few steps, so sinks and general neurons differ from init."""
    model = get_memsink_model(tiny_model(model_type), cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        x = batch(seed=step)
        model(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2, 3]) + step).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def load_in_fresh_process(path, x):
    """Load with plain transformers in a process that never imports hf_memsinks; return logits
    and everything it logged."""
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()
        assert "hf_memsinks" not in sys.modules
        x = torch.tensor({x.tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=x).logits, {str(path / "fresh_logits.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return torch.load(path / "fresh_logits.pt"), proc.stdout + proc.stderr


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bloom"])
def test_removed_model_saves_and_loads_in_a_process_without_hf_memsinks(tmp_path, model_type):
    model = trained(model_type)
    x = batch()
    expected = logits(model, x)
    plain = model.remove_sinks()
    plain.save_pretrained(tmp_path)
    files = " ".join(p.name for p in tmp_path.iterdir())
    assert "memsink" not in files
    assert "sink" not in (tmp_path / "config.json").read_text()
    got, log = load_in_fresh_process(tmp_path, x)
    assert (got - expected).abs().max() < 1e-5
    for word in ("UNEXPECTED", "MISSING", "MISMATCH", "newly initialized", "not used"):
        assert word not in log, log


def test_forget_ids_export_equals_exclude_mode():
    model = trained("llama", MemSinkConfig(sink_fraction=0.3, sink_active_prob=0.3,
                                           reference=PaperReference(per_layer_masks=True)))
    x = batch()
    with model.sink_mode("exclude", [2, 4]):
        expected = logits(model, x)
    plain = model.remove_sinks(forget_ids=[2, 4])
    assert plain.config.intermediate_size == 64  # general + sinks: the full split width again
    assert (logits(plain, x) - expected).abs().max() < 1e-5


def test_removing_twice_or_from_a_plain_model_is_a_clear_error():
    model = trained()
    model.remove_sinks()
    with pytest.raises(AttributeError, match="remove_sinks"):  # a plain model: no method of ours is left
        model.remove_sinks()
    with pytest.raises(ValueError, match="never patched|already removed"):
        remove_sinks(model)
    with pytest.raises(ValueError, match="never patched"):
        remove_sinks(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="already has memsinks"):
        get_memsink_model(get_memsink_model(tiny_model("gpt2"), CFG), CFG)


@pytest.mark.parametrize("model_type, cfg", [
    ("gpt2", CFG),
    ("llama", MemSinkConfig(mode="add", sink_fraction=0.2, reference=PaperReference(per_layer_masks=True))),
    ("bloom", MemSinkConfig(sink_fraction=0.25, layers=[1])),
    ("llama", MemSinkConfig(mode="add", layers={0: 0.5, -1: 0.2})),
    ("phi3", CFG),
])
def test_checkpoint_restores_exactly_in_every_mode_and_training_resumes(tmp_path, model_type, cfg):
    model = trained(model_type, cfg)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "memsink_config.json").read_text())
    assert saved["sink_layout"] and saved["mode"] == {"auto": "split"}.get(cfg.mode, cfg.mode)  # (resolved)
    restored = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(restored) is type(model)
    x, ids = batch(), torch.tensor([2, 3, 4])
    for mode, mode_ids, kw in [("drop", None, {}), ("expected", None, {}), ("exclude", [3], {}),
                               ("activate", None, {"sequence_ids": ids})]:
        with model.sink_mode(mode, mode_ids), restored.sink_mode(mode, mode_ids):
            assert torch.equal(logits(model, x, **kw), logits(restored, x, **kw)), mode
    for m in (model, restored):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
        opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), restored.named_parameters()):
        assert torch.equal(p, q), n


def test_restored_unpickled_and_copied_models_keep_the_checkpoint_format(tmp_path):
    """The format is state-dict hooks on the patched modules (hf_memsinks.checkpoints.sink_tensors): a
    model restored by from_pretrained, then unpickled or deep-copied, has them too. Its state dict is
    the saved one (sinks apart, layout in the metadata), and it loads sink tensors back."""
    model = trained("gpt2")
    model.save_pretrained(tmp_path)
    state = model.state_dict()
    assert any(k.endswith(".sink_weight") for k in state)
    restored = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path)
    for other in (restored, pickle.loads(pickle.dumps(restored)), copy.deepcopy(restored)):
        got = other.state_dict()
        assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)
        assert got._metadata["transformer.h.0.mlp.c_fc"]["memsink"] == state._metadata["transformer.h.0.mlp.c_fc"][
            "memsink"]
        zeros = {k: torch.zeros_like(v) for k, v in state.items() if ".sink_" in k}
        result = other.load_state_dict(zeros, strict=False)
        assert result.unexpected_keys == [] and set(other.sink_parameters()) == set(zeros)
        assert all(not p.any() for p in other.sink_parameters().values())


@pytest.mark.parametrize("model_type, cfg", [
    ("gpt2", CFG),
    ("llama", MemSinkConfig(mode="add", sink_fraction=0.2)),
    ("bloom", MemSinkConfig(sink_fraction=0.25)),  # width hard-coded: zero-padded sinks
])
def test_plain_transformers_loads_a_memsink_checkpoint_as_the_sink_free_model(tmp_path, model_type, cfg):
    cfg = dataclasses.replace(cfg, reference=None)
    model = trained(model_type, cfg)
    model.save_pretrained(tmp_path)
    x = batch()
    expected = logits(copy.deepcopy(model).remove_sinks(), x)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not hasattr(plain, "memsink_config")
    assert (logits(plain, x) - expected).abs().max() < 1e-5
    # With every sink on, the logits would differ: the plain load really dropped them.
    with model.sink_mode("expected"):
        assert (logits(model, x) - expected).abs().max() > 1e-4


def test_from_pretrained_patches_a_plain_model_and_rejects_ambiguity(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    model = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "base", memsink_config=CFG)
    assert model.memsink_config == CFG and model.config.intermediate_size == 48
    with pytest.raises(ValueError, match="plain model: pass memsink_config"):
        AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "sinks")
    with pytest.raises(ValueError, match="already a memsink checkpoint"):
        AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "sinks", memsink_config=CFG)


def test_unknown_architecture_error_and_explicit_module_names():
    from coverage_models import build_tiny

    with pytest.raises(NotImplementedError, match="(?s)'mamba'.*target_modules"):  # no MLP in a Mamba block
        get_memsink_model(build_tiny("mamba"), CFG)
    model = tiny_model("cohere")
    names = {"mlp": "mlp", "in_proj": ["gate_proj", "up_proj"], "out_proj": "down_proj",
             "width_attr": "intermediate_size"}
    cfg = MemSinkConfig(sink_fraction=0.25, target_modules=names)
    model = get_memsink_model(model, cfg).eval()
    x = batch()
    expected = logits(model, x)
    assert (logits(model.remove_sinks(), x) - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="found no MLP"):
        get_memsink_model(tiny_model("cohere"), MemSinkConfig(target_modules={**names, "out_proj": "nope"}))
