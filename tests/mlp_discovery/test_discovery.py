"""Discovery of MLPs from structure (hf_memsinks.mlp_discovery.search) and sinks in batched MoE experts."""

import copy

import pytest
import torch
from coverage_models import build_tiny
from tiny_models import MODEL_TYPES, batch, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, PaperReference, get_memsink_model
from hf_memsinks.mlp_discovery.resolve import mlp_sites
from hf_memsinks.mlp_discovery.search import check_site, discover_sites
from hf_memsinks.mlp_discovery.spec import find_mlp_sites, spec_from_target_modules

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
    return spec_from_target_modules({"mlp": mlp, "in_proj": list(ins), "out_proj": out, "width_attr": width,
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
    spec = spec_from_target_modules({"mlp": "self_attn", "in_proj": ["q_proj"], "out_proj": "o_proj"})
    site = find_mlp_sites(model, spec)[0]
    reason = check_site(model, site)
    assert reason is not None
    assert check_site(model, discover_sites(model)[0]) is None


def test_no_mlp_error_names_the_type_and_how_to_name_modules():
    model = build_tiny("mamba")
    with pytest.raises(NotImplementedError) as e:
        get_memsink_model(model, MemSinkConfig())
    assert "'mamba'" in str(e.value) and "target_modules" in str(e.value) and "mixer" in str(e.value)


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_zero_padded_checkpoint_is_restored(tmp_path, model_type):
    """Without a width field the checkpoint zero-pads the sinks, so the base model loaded to
    restore it has silent last neurons: discovery's on-the-path check must not pick those."""
    model = get_memsink_model(build_tiny(model_type), MemSinkConfig()).train()
    x = batch()
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2, 3])).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad if p.grad is not None else 0, alpha=-0.1)
    model.eval().save_pretrained(tmp_path / "ckpt")
    restored = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad(), model.sink_mode("expected"), restored.sink_mode("expected"):
        assert (restored(input_ids=x).logits - model(input_ids=x).logits).abs().max() < 1e-5


def test_mlp_with_a_norm_over_its_neurons_is_found_with_its_norm():
    """BitNet normalises the hidden neurons inside its MLP (``ffn_sub_norm``, an RMSNorm of the
    MLP's width): neurons cannot be deleted one by one, but the second check finds the norm, and
    the width field is found with the norm's weight counted as part of the MLP."""
    model = build_tiny("bitnet")
    sites = discover_sites(model)
    assert [s.name for s in sites] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for i, site in enumerate(sites):
        mlp = model.model.layers[i].mlp
        assert site.in_proj == [mlp.gate_proj, mlp.up_proj] and site.out_proj is mlp.down_proj
        assert site.norm is mlp.ffn_sub_norm and (site.width, site.width_attr) == (64, "intermediate_size")
    assert all(s.norm is None for s in discover_sites(tiny_model("llama")))


def test_norm_that_does_not_keep_silent_neurons_silent_is_refused():
    """A LayerNorm over the hidden neurons maps zeros to nonzeros (it subtracts the mean): a
    masked sink would still feed the output projection and get gradient, so the check says no."""
    model = build_tiny("bitnet")
    for layer in model.model.layers:
        layer.mlp.ffn_sub_norm = torch.nn.LayerNorm(64)
    match = "(?s)'bitnet'.*through the norm 'ffn_sub_norm'.*not zero after its norm"
    with pytest.raises(NotImplementedError, match=match):
        get_memsink_model(model, MemSinkConfig())


def _grads_by_neuron(site):
    """Per hidden neuron of one patched MLP: the summed |gradient| of its gate and up rows, of its
    down column and of its norm weight."""
    mlp_grads = [site.in_proj[0].weight.grad.abs().sum(1), site.in_proj[1].weight.grad.abs().sum(1),
                 site.out_proj.weight.grad.abs().sum(0), site.norm.weight.grad.abs()]
    return torch.stack(mlp_grads)  # (4, width)


@pytest.mark.parametrize("eval_scaling", ["none", "paper"])
def test_bitnet_sinks_are_masked_before_its_norm_and_removed_exactly(tmp_path, eval_scaling):
    """Sinks at the input of BitNet's ffn_sub_norm: a training step with IDs moves only the active
    sinks (an inactive sink's gate and up rows, down column and norm weight get exactly zero
    gradient, also through the norm's statistics); eval in the default mode equals the
    remove_sinks() model (full width, sink weights zero), which plain Transformers saves and
    reloads with no missing or unexpected keys and the same logits."""
    from hf_memsinks.ids.masks import sink_mask

    config = MemSinkConfig(reference=PaperReference(eval_scaling=eval_scaling))
    model = get_memsink_model(build_tiny("bitnet"), config)
    x, ids = batch(2, 10), torch.tensor([5, 9])
    site = model.memsink.sites[0]
    g, s = site.general, site.sinks
    active = sink_mask(ids, s, config.sink_active_prob, salt=config.salt).any(0)
    assert 0 < int(active.sum()) < s
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
    for site in model.memsink.sites:
        grads = _grads_by_neuron(site)
        assert (grads[:, g:][:, ~active] == 0).all(), "an inactive sink got a gradient"
        # Active sinks learn, save those ReLU^2 leaves dead on every token (as general neurons can be).
        assert (grads[:, g:][:, active].sum(0) > 0).float().mean() > 0.5
        assert (grads[:, :g].sum(0) > 0).float().mean() > 0.5
    opt.step()
    after = model.state_dict()
    for name in before:
        if name.endswith(("gate_proj.sink_weight", "up_proj.sink_weight", "ffn_sub_norm.sink_weight")):
            moved = (after[name] != before[name]).reshape(s, -1).any(1)
        elif name.endswith("down_proj.sink_weight"):
            moved = (after[name] != before[name]).any(0)
        else:
            continue
        assert not (moved & ~active).any() and moved.any(), name

    model.eval()
    with torch.no_grad():
        dropped = model(input_ids=x).logits
        with model.sink_mode("activate", ids):
            assert (model(input_ids=x).logits - dropped).abs().max() > 1e-4  # the sinks matter
    model.save_pretrained(tmp_path / "patched")
    restored = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "patched").eval()
    with torch.no_grad(), restored.sink_mode("activate", ids), model.sink_mode("activate", ids):
        assert (restored(input_ids=x).logits - model(input_ids=x).logits).abs().max() < 1e-5
    with pytest.raises(NotImplementedError, match="'bitnet'.*normalises over the hidden neurons"):
        restored.remove_sinks(forget_ids=[5])

    plain = model.remove_sinks()
    assert type(plain).__name__ == "BitNetForCausalLM" and plain.config.intermediate_size == g + s
    mlp = plain.model.layers[0].mlp
    assert (mlp.gate_proj.weight[g:] == 0).all() and (mlp.up_proj.weight[g:] == 0).all()
    assert (mlp.down_proj.weight[:, g:] == 0).all() and (mlp.ffn_sub_norm.weight[g:] == 0).all()
    with torch.no_grad():
        assert (plain(input_ids=x).logits - dropped).abs().max() < 1e-5
    plain.save_pretrained(tmp_path / "plain")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (reloaded.eval()(input_ids=x).logits - dropped).abs().max() < 1e-5


def test_bitnet_eval_modes_equal_hand_folded_models():
    """Every eval mode of a patched BitNet equals the unpatched model (split mode keeps its
    weights) with the mode's coefficient on each neuron *before* the norm (folded into up_proj's
    rows: BitNet's MLP is linear in them) and the drop mode's general scale after it (on
    down_proj's columns)."""
    from hf_memsinks.ids.masks import sink_mask

    cfg = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4,
                        reference=PaperReference(eval_scaling="paper", per_layer_masks=True))
    p = cfg.sink_active_prob
    model = get_memsink_model(build_tiny("bitnet"), cfg).eval()
    x = batch(3, 12)

    def folded(sink_coef, general_scale=1.0):
        plain = build_tiny("bitnet")  # the same seed, so the same weights as the patched model's
        g, s = cfg.num_sinks_for(64)
        with torch.no_grad():
            for i, layer in enumerate(plain.model.layers):
                layer.mlp.up_proj.weight.mul_(torch.cat([torch.ones(g), sink_coef(i, s).float()])[:, None])
                layer.mlp.down_proj.weight[:, :g].mul_(general_scale)
        return plain

    def logits(m, inputs, **kw):
        with torch.no_grad():
            return m(input_ids=inputs, **kw).logits

    drop = folded(lambda layer, s: torch.zeros(s), cfg.general_eval_scale)
    assert (logits(model, x) - logits(drop, x)).abs().max() < 1e-5
    with model.sink_mode("expected"):
        assert (logits(model, x) - logits(folded(lambda layer, s: torch.full((s,), p)), x)).abs().max() < 1e-5
    forget = torch.tensor([11, 12])
    with model.sink_mode("exclude", forget):
        excluded = folded(lambda layer, s: p * ~sink_mask(forget, s, p, layer=layer).any(0))
        assert (logits(model, x) - logits(excluded, x)).abs().max() < 1e-5
    ids = torch.tensor([7, 8, 9])
    with model.sink_mode("activate"):
        got = logits(model, x, sequence_ids=ids)
    for row, seq_id in enumerate(ids.tolist()):
        own = folded(lambda layer, s: sink_mask(torch.tensor([seq_id]), s, p, layer=layer)[0])
        assert (got[row] - logits(own, x[row : row + 1])[0]).abs().max() < 1e-5
    assert torch.equal(got, logits(model.train(), x, sequence_ids=ids))  # the training-mode function
    per_token = logits(model, x, sequence_ids=ids[:, None].expand(3, 12))
    assert torch.equal(got, per_token)


def test_bitnet_refuses_added_sinks():
    """Appending neurons to an MLP that normalises over them changes every neuron's scale (the
    norm's mean runs over the width), so "add" mode cannot keep the outputs: a clear error."""
    with pytest.raises(NotImplementedError, match="mode='add'.*'bitnet'"):
        get_memsink_model(build_tiny("bitnet"), MemSinkConfig(mode="add"))


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


def test_bitnet_named_by_hand_with_its_norm_equals_discovery():
    """target_modules with "norm" gives the sites discovery finds: the same masked training step
    and the same removed model."""
    x, ids = batch(2, 10), torch.tensor([5, 9])
    names = {"mlp": "mlp", "in_proj": ["gate_proj", "up_proj"], "out_proj": "down_proj",
             "width_attr": "intermediate_size", "norm": "ffn_sub_norm"}
    found = get_memsink_model(build_tiny("bitnet"), MemSinkConfig())
    named = get_memsink_model(build_tiny("bitnet"), MemSinkConfig(target_modules=names))
    assert [s.norm is not None for s in named.memsink.sites] == [True] * len(found.memsink.sites)
    for model in (found, named):
        model.train()
        model(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
    for (name, p), (_, q) in zip(found.named_parameters(), named.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    with torch.no_grad():
        assert torch.equal(found.remove_sinks().eval()(input_ids=x).logits,
                           named.remove_sinks().eval()(input_ids=x).logits)
    with pytest.raises(ValueError, match="'norm' must be the name"):
        MemSinkConfig(target_modules={**names, "norm": 3})
