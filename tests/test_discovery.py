"""Discovery of MLPs from structure (hf_memsinks.discovery) and sinks in batched MoE experts."""

import copy

import pytest
import torch
from coverage_models import build_tiny
from tiny_models import MODEL_TYPES, batch, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, get_memsink_model
from hf_memsinks.architectures import ARCHITECTURES, find_mlp_sites, mlp_sites, spec_for
from hf_memsinks.discovery import check_site, discover_sites

# What the per-type table said before discovery replaced it: discovery must find the same.
OLD_TABLE = {
    "gpt2": ("mlp", ("c_fc",), "c_proj", "n_inner", 1), "gpt_bigcode": ("mlp", ("c_fc",), "c_proj", "n_inner", 1),
    "gpt_neo": ("mlp", ("c_fc",), "c_proj", "intermediate_size", 1),
    "gptj": ("mlp", ("fc_in",), "fc_out", "n_inner", 1),
    "gpt_neox": ("mlp", ("dense_h_to_4h",), "dense_4h_to_h", "intermediate_size", 1),
    "falcon": ("mlp", ("dense_h_to_4h",), "dense_4h_to_h", "ffn_hidden_size", 1),
    "bloom": ("mlp", ("dense_h_to_4h",), "dense_4h_to_h", None, 1), "mpt": ("ffn", ("up_proj",), "down_proj", None, 1),
    "opt": ("", ("fc1",), "fc2", "ffn_dim", 1), "phi": ("mlp", ("fc1",), "fc2", "intermediate_size", 1),
    "phi3": ("mlp", ("gate_up_proj",), "down_proj", "intermediate_size", 2),
    "starcoder2": ("mlp", ("c_fc",), "c_proj", "intermediate_size", 1),
}
GATED = ("mlp", ("gate_proj", "up_proj"), "down_proj", "intermediate_size", 1)


def _table_spec(model_type):
    mlp, ins, out, width, chunks = OLD_TABLE.get(model_type, GATED)
    return spec_for(model_type, {"mlp": mlp, "in_proj": list(ins), "out_proj": out, "width_attr": width,
                                 "in_proj_chunks": chunks})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_discovery_finds_what_the_old_table_named(model_type):
    model = tiny_model(model_type)
    expected = find_mlp_sites(model, _table_spec(model_type))
    found = discover_sites(model)
    assert [s.name for s in found] == [s.name for s in expected]
    for f, e in zip(found, expected):
        assert f.in_proj == e.in_proj and f.out_proj is e.out_proj
        assert (f.width, f.chunks, f.width_attr) == (e.width, e.chunks, e.width_attr)
    assert model_type not in ARCHITECTURES  # the table holds exceptions only


def test_unset_width_field_is_found_by_rebuilding():
    """GPT-2's n_inner defaults to None (4 x hidden): no field has the width's value, yet
    setting it sizes the MLP, so removal shrinks it."""
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97))
    assert [(s.width, s.width_attr) for s in mlp_sites(model)] == [(128, "n_inner")] * 2
    patched = get_memsink_model(model, MemSinkConfig(sink_fraction=0.25)).eval()
    assert patched.remove_sinks().config.n_inner == 96


def test_check_rejects_an_attention_block_taken_for_an_mlp():
    """q/k/v -> o maps the hidden size to a width and back, but its neurons are heads: deleting
    some is not zeroing their output weights. The check must say no."""
    model = tiny_model("llama")
    spec = spec_for("llama", {"mlp": "self_attn", "in_proj": ["q_proj"], "out_proj": "o_proj"})
    site = find_mlp_sites(model, spec)[0]
    reason = check_site(model, site)
    assert reason is not None
    assert check_site(model, discover_sites(model)[0]) is None


def test_no_mlp_error_names_the_type_and_how_to_name_modules():
    model = build_tiny("mamba")
    with pytest.raises(NotImplementedError) as e:
        get_memsink_model(model, MemSinkConfig())
    assert "'mamba'" in str(e.value) and "target_modules" in str(e.value) and "mixer" in str(e.value)


def test_mlp_with_a_norm_over_its_neurons_is_refused():
    """BitNet normalises the hidden neurons inside its MLP: they are not independent, so
    removing sinks cannot be exact."""
    with pytest.raises(NotImplementedError, match="(?s)'bitnet'.*something else is sized by its width"):
        get_memsink_model(build_tiny("bitnet"), MemSinkConfig())


# ---- mixture of experts ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_experts_sinks_follow_each_tokens_id(model_type):
    """Per-token IDs: a token's inactive sinks get no gradient in any expert, and two tokens of
    different documents in one row see different sinks."""
    model = get_memsink_model(build_tiny(model_type), MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.5))
    site = next(s for s in model.memsink.sites if s.kind == "experts")
    experts = site.out_proj
    assert site.general % 8 == 0
    seen = []
    experts.register_forward_hook(lambda m, a, out: seen.append(m.memsink.state.current().rows[id(m)]))
    x = batch(2, 10)
    ids = torch.tensor([[5] * 5 + [9] * 5, [5] * 10])
    model.train()
    model(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
    # Against the same step with one ID everywhere: the loss must differ (masks are per token).
    one = copy.deepcopy(model)
    one.zero_grad()
    loss_one = one(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 5])).loss
    loss_two = model(input_ids=x, labels=x, sequence_ids=ids).loss
    assert not torch.allclose(loss_one, loss_two)
    assert seen and seen[0][0] == 20


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_experts_checkpoint_round_trip_and_forget_ids(tmp_path, model_type):
    config = MemSinkConfig(sink_fraction=0.3, sink_active_prob=0.3)
    model = get_memsink_model(build_tiny(model_type), config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        x = batch(seed=step)
        model(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2, 3]) + step).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    x = batch()
    with torch.no_grad(), model.sink_mode("expected"):
        expected = model(input_ids=x).logits
    with torch.no_grad(), model.sink_mode("exclude", [2]):
        excluded = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "ckpt")
    # Plain Transformers loads it as the sink-free model; hf_memsinks restores the sinks.
    restored = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad(), restored.sink_mode("expected"):
        assert (restored(input_ids=x).logits - expected).abs().max() < 1e-5
    forgot = restored.remove_sinks(forget_ids=[2])
    with torch.no_grad():
        assert (forgot(input_ids=x).logits - excluded).abs().max() < 1e-5
