"""Train/eval semantics: ID validation, the paper's eval modes checked against hand-folded
plain models, generate in every mode, activation checkpointing."""


import pytest
import torch
from tiny_models import batch, checkpointing_enable, tiny_model

from hf_memsinks import NO_SEQUENCE, MemSinkConfig, PaperReference, get_memsink_model, sink_mask
from hf_memsinks.layers.neurons import neuron_dim
from hf_memsinks.layers.projections import is_patched_projection
from hf_memsinks.mlp_discovery.resolve import mlp_sites

CFG = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4)


def patched(model_type="gpt2", cfg=CFG, seed=0):
    return get_memsink_model(tiny_model(model_type, seed=seed), cfg)


def folded_copy(model_type, cfg, sink_coef, general_coef=1.0, seed=0):
    """The unpatched model (split mode keeps its weights) with the output projection's general
    columns times ``general_coef`` and sink columns times ``sink_coef(layer, S)``: the math each
    eval mode should equal, computed without hf_memsinks' forward."""
    model = tiny_model(model_type, seed=seed)
    for site in mlp_sites(model):
        general, sinks = cfg.num_sinks_for(site.width)
        coef = torch.cat([torch.full((general,), general_coef), sink_coef(site.layer, sinks).float()])
        dim = neuron_dim(site.out_proj, "out")
        shape = [1, 1]
        shape[dim] = -1
        with torch.no_grad():
            site.out_proj.weight.mul_(coef.reshape(shape))
    return model


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_eval_modes_equal_hand_folded_models(model_type):
    cfg = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4,
                        reference=PaperReference(eval_scaling="paper", per_layer_masks=True))
    model = patched(model_type, cfg).eval()
    x = batch()
    p = cfg.sink_active_prob

    drop = folded_copy(model_type, cfg, lambda layer, s: torch.zeros(s), general_coef=cfg.general_eval_scale)
    assert (logits(model, x) - logits(drop, x)).abs().max() < 1e-5

    expected = folded_copy(model_type, cfg, lambda layer, s: torch.full((s,), p))
    with model.sink_mode("all"):  # the paper's name for "expected"
        assert (logits(model, x) - logits(expected, x)).abs().max() < 1e-5

    forget = torch.tensor([11, 12])
    excluded = folded_copy(model_type, cfg, lambda layer, s: p * ~sink_mask(forget, s, p, layer=layer).any(0))
    with model.sink_mode("exclude", forget):
        assert (logits(model, x) - logits(excluded, x)).abs().max() < 1e-5

    # activate: one sequence ID, so one hand-folded model per row
    ids = torch.tensor([7, 8, 9])
    with model.sink_mode("activate"):
        got = logits(model, x, sequence_ids=ids)
    for row, seq_id in enumerate(ids.tolist()):
        own = folded_copy(model_type, cfg, lambda layer, s: sink_mask(torch.tensor([seq_id]), s, p, layer=layer)[0])
        assert (got[row] - logits(own, x[row : row + 1])[0]).abs().max() < 1e-5
    # ... and it is exactly the training-mode function (dropout is 0 in these models)
    assert torch.equal(got, logits(model.train(), x, sequence_ids=ids))


def test_training_requires_ids_with_a_message_that_says_what_to_pass():
    model = patched().train()
    x = batch()
    with pytest.raises(ValueError, match=r"needs sequence_ids: pass model\(\.\.\., sequence_ids=ids\)"):
        model(input_ids=x, labels=x)


def test_general_only_training_when_allowed_leaves_sinks_untouched():
    model = patched(cfg=MemSinkConfig(sink_fraction=0.25, require_sequence_ids=False)).train()
    x = batch()
    model(input_ids=x, labels=x).loss.backward()
    for name, module in model.named_modules():
        if hasattr(module, "general_and_sink_parts"):
            dim = neuron_dim(module, module.memsink.role)
            g = module.weight.grad.narrow(dim, 0, module.memsink.general)
            s = module.weight.grad.narrow(dim, module.memsink.general, module.memsink.sinks)
            assert torch.count_nonzero(s) == 0 and torch.count_nonzero(g) > 0
    # The reserved ID behaves the same way.
    model.zero_grad()
    model(input_ids=x, labels=x, sequence_ids=torch.full((3,), NO_SEQUENCE)).loss.backward()
    assert all(torch.count_nonzero(t) == 0 for t in
               [m.weight.grad.narrow(neuron_dim(m, m.memsink.role), m.memsink.general, m.memsink.sinks)
                for m in model.modules() if is_patched_projection(m)])


@pytest.mark.parametrize("ids, error, match", [
    (torch.tensor([1, 2]), ValueError, "2 IDs for a batch of 3"),
    (torch.ones(3, 5, dtype=torch.long), ValueError, "length 5 but the inputs have 12"),
    (torch.ones(2, 12, dtype=torch.long), ValueError, "2 rows for a batch of 3"),
    (torch.ones(3, 12, 1, dtype=torch.long), ValueError, r"shape \(batch,\) or \(batch, seq_len\)"),
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "integers"),
])
def test_bad_ids_raise_clear_errors(ids, error, match):
    model = patched().train()
    x = batch()
    with pytest.raises(error, match=match):
        model(input_ids=x, labels=x, sequence_ids=ids)


def test_bad_modes_raise_clear_errors():
    model = patched()
    with pytest.raises(ValueError, match="unknown sink mode"):
        model.set_sink_mode("half")
    with pytest.raises(ValueError, match="needs the sequence IDs"):
        model.set_sink_mode("exclude")
    with pytest.raises(ValueError, match="takes no sequence IDs"):
        model.set_sink_mode("drop", [1])
    with pytest.raises(ValueError, match="needs sequence IDs"), model.sink_mode("activate"):
        model(input_ids=batch())


def test_per_token_ids_equal_per_sequence_ids_when_constant():
    model = patched().train()
    x = batch()
    a = logits(model, x, sequence_ids=torch.tensor([4, 5, 6]))
    b = logits(model, x, sequence_ids=torch.tensor([4, 5, 6])[:, None].expand(3, 12))
    assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_generate_works_in_every_mode(model_type):
    model = patched(model_type).eval()
    prompt = batch(size=2, length=5)
    ids = torch.tensor([3, 4])
    outputs = {}
    for mode, mode_ids, kw in [
        ("drop", None, {}),
        ("drop", None, {"sequence_ids": ids}),  # IDs accepted and ignored
        ("expected", None, {}),
        ("exclude", [3], {}),
        ("activate", None, {"sequence_ids": ids}),
        ("activate", ids, {}),
        ("activate", None, {"sequence_ids": ids[:, None].expand(2, 5)}),  # per token
    ]:
        with model.sink_mode(mode, mode_ids):
            out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, **kw)
        assert out.shape == (2, 9)
        outputs.setdefault(mode, []).append(out)
    assert all(torch.equal(o, outputs["activate"][0]) for o in outputs["activate"])
    assert torch.equal(outputs["drop"][0], outputs["drop"][1])
    # Cached generation equals recomputing each step from scratch in activate mode.
    with model.sink_mode("activate", ids):
        seq = prompt
        for _ in range(4):
            nxt = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(seq, outputs["activate"][0])


@pytest.mark.parametrize("model_type, reentrant", [("gpt2", False), ("llama", False), ("llama", True)])
def test_gradients_equal_with_activation_checkpointing(model_type, reentrant):
    x = batch()
    ids = torch.tensor([[1] * 6 + [2] * 6, [3] * 12, [4] * 4 + [5] * 8])
    grads = []
    for checkpointing in (False, True):
        model = patched(model_type).train()
        if checkpointing:
            checkpointing_enable(model, {"use_reentrant": reentrant})
        model(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_checkpointing_enabled_before_patching_and_with_interleaved_forwards():
    x = batch()
    ids_a, ids_b = torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9])
    reference = patched("llama").train()
    reference(input_ids=x, labels=x, sequence_ids=ids_a).loss.backward()
    model = tiny_model("llama")
    checkpointing_enable(model)
    model = get_memsink_model(model, CFG).train()
    loss_a = model(input_ids=x, labels=x, sequence_ids=ids_a).loss
    model(input_ids=x, labels=x, sequence_ids=ids_b)  # another forward before A's backward
    loss_a.backward()
    for (n, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n
