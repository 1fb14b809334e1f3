"""MemSinkConfig.compute_active_sinks_only (layers/active_sinks.py): a training forward that computes
only each row's active sinks gives the dense path's logits and every gradient (masked sinks add exact
zeros there), for per-sequence and per-token IDs, rows without an ID, sinks stored apart and the routed
forward of general_sightings; wherever it cannot apply, the dense path runs. LoRA on the MLP:
tests/layers/test_active_sinks_lora.py."""

import pytest
import torch
from coverage_models import build_tiny
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_model

import hf_memsinks.layers.projections as projections
from hf_memsinks import MemSinkConfig, get_memsink_model, train_sinks
from hf_memsinks.config import PaperReference
from hf_memsinks.layers.active_sinks import active_sinks_for
from hf_memsinks.layers.projections import is_patched_projection
from hf_memsinks.layers.state import ForwardSinks

FIRST_LAYER = {"layers": [0], "sink_fraction": 2 / 3}
# per row: one ID, no ID, and the union of several documents' sinks (a packed row)
PER_SEQUENCE = torch.tensor([3, -1, 9])
PER_TOKEN = torch.tensor([[3] * 5 + [4] * 7, [-1] * 12, [7] * 4 + [-1] * 3 + [8] * 5])


@pytest.fixture
def gathered_calls(monkeypatch):
    """How many output projections took the gathered path."""
    calls = []
    original = projections.gathered_output

    def spy(module, h, active):
        calls.append(active.index.shape[1])
        return original(module, h, active)

    monkeypatch.setattr(projections, "gathered_output", spy)
    return calls


def pair(build, **overrides):
    """The same patched model twice: dense, and computing only the active sinks (no optimizer: the
    sink learning-rate hook's warning is not what these tests are about)."""
    models = []
    for on in (False, True):
        model = get_memsink_model(build(), MemSinkConfig.for_finetuning(**overrides, compute_active_sinks_only=on))
        model.memsink.sink_lr_warned = True
        models.append(model)
    return models


def step(model, x, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x, sequence_ids=ids)
    out.loss.backward()
    return out.logits.detach()


def assert_same_step(dense, gathered, x, ids):
    torch.testing.assert_close(step(gathered, x, ids), step(dense, x, ids), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(dense.named_parameters(), gathered.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def inactive_sink_grads(model):
    """Every patched tensor's gradient on the sinks the dense step left at exactly zero gradient."""
    out = []
    for module in model.modules():
        if is_patched_projection(module):
            for name, dim in module.neuron_dims().items():
                grad = getattr(module, name).grad
                if grad is not None:
                    out.append(module.split(grad, dim)[1])
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi3", "opt", "gpt_neox"])
@pytest.mark.parametrize("ids", [PER_SEQUENCE, PER_TOKEN], ids=["per_sequence", "per_token"])
@pytest.mark.parametrize("overrides", [{}, FIRST_LAYER], ids=["every_layer", "first_layer"])
def test_gathered_step_equals_the_dense_step(model_type, ids, overrides, gathered_calls):
    """gpt2: Conv1D; llama: gate and up; phi3: fused gate+up (two chunks); opt: (B * T, ·) MLP
    input; gpt_neox: biases. Inactive sinks get exactly zero gradient, as in the dense step."""
    dense, gathered = pair(lambda: tiny_model(model_type), **overrides)
    x = batch(3, 12)
    assert_same_step(dense, gathered, x, ids)
    assert gathered_calls and max(gathered_calls) < dense.memsink.sites[0].sinks  # only the active sinks
    for d, g in zip(inactive_sink_grads(dense), inactive_sink_grads(gathered)):
        assert torch.equal(d == 0, g == 0)


def test_a_batch_without_ids_gathers_no_sink(gathered_calls):
    dense, gathered = pair(lambda: tiny_model("llama"))
    assert_same_step(dense, gathered, batch(3, 12), torch.tensor([-1, -1, -1]))
    assert gathered_calls and set(gathered_calls) == {0}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sinks_apart_under_lora_on_attention(model_type, gathered_calls):
    """train_sinks: the sinks train stored apart; the gathered rows are theirs (randomised here) and
    their and the adapters' gradients match."""
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[model_type]
    models = []
    for model in pair(lambda: tiny_model(model_type)):
        torch.manual_seed(0)  # (the adapters' initial weights)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        names = train_sinks(model)
        assert names
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "sink_part_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        models.append(model)
    assert_same_step(*models, batch(3, 12), PER_TOKEN)
    assert gathered_calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_general_sightings_routed_forward(checkpointing, gathered_calls):
    """First sightings train the general path (no sink on), repeats their sinks alone (a forward with
    the general parameters frozen); a batch of both runs both."""
    dense, gathered = pair(lambda: tiny_model("llama"), general_sightings=1, sightings_by="ids")
    for model in (dense, gathered):
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    for seed, ids in enumerate([torch.tensor([5, 6, 7]), torch.tensor([5, 6, 8]), torch.tensor([5, 6, 7])]):
        assert_same_step(dense, gathered, batch(3, 12, seed=seed), ids)
    assert gathered_calls and max(gathered_calls) > 0


@pytest.mark.parametrize("model_type", ["bitnet", "qwen2_moe"])
def test_norm_between_projections_and_experts(model_type, gathered_calls):
    """BitNet's norm over the hidden neurons needs every sink: dense path. MoE experts keep their own
    path; qwen2_moe's shared expert is a plain MLP."""
    mode = {"mode": "split"} if model_type == "bitnet" else {}
    dense, gathered = pair(lambda: build_tiny(model_type), **mode)
    assert_same_step(dense, gathered, batch(2, 10), torch.tensor([5, 9]))
    if model_type == "bitnet":
        assert not gathered_calls


def test_default_config_eval_and_compile_take_the_dense_path(gathered_calls, monkeypatch):
    dense = get_memsink_model(tiny_model("llama"), MemSinkConfig(mode="add", sink_fraction=0.5, sink_active_prob=0.05))
    dense.memsink.sink_lr_warned = True
    assert not MemSinkConfig().compute_active_sinks_only and MemSinkConfig.for_finetuning().compute_active_sinks_only
    step(dense, batch(3, 12), PER_SEQUENCE)
    assert not gathered_calls
    _, gathered = pair(lambda: tiny_model("llama"))
    gathered.eval()
    for mode in ("activate", "expected", "drop"):
        gathered.set_sink_mode(mode)
        with torch.no_grad():
            gathered(input_ids=batch(3, 12), sequence_ids=PER_SEQUENCE)
    assert not gathered_calls
    module = next(m for m in gathered.modules() if is_patched_projection(m)).train()
    call = ForwardSinks("mask", PER_SEQUENCE)
    x = torch.zeros(3, 12, 32)
    assert active_sinks_for(module, call, x) is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert active_sinks_for(module, call, x) is None


def test_the_switch_is_validated():
    with pytest.raises(ValueError, match="compute_active_sinks_only"):
        MemSinkConfig(compute_active_sinks_only="yes")


def test_every_sink_active_keeps_the_dense_layout(gathered_calls):
    """When some row activates every sink, the gathered layout is the dense one (sinks in order):
    an output projection can tell from its input's width alone whether its inputs gathered."""
    dense, gathered = pair(lambda: tiny_model("llama"), num_sink_neurons=2, sink_active_prob=0.9)
    ids = torch.tensor([3, 4, 5])
    sinks = gathered.memsink.state.active_sinks(ForwardSinks("mask", ids), 0, 2)
    assert sinks.index.tolist() == [[0, 1]] * 3
    assert_same_step(dense, gathered, batch(3, 12), ids)
    assert gathered_calls


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi3"])
def test_autocast_over_fp32_weights_gathers_as_autocast_computes(gathered_calls, model_type):
    """Trainer(bf16=True) on fp32 weights: the gathered Functions get autocast's bf16 casts, and
    every gradient comes back fp32, close to the dense path's (both computed in bf16)."""
    dense, gathered = pair(lambda: tiny_model(model_type))
    x = batch(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [step(m, x, PER_SEQUENCE) for m in (dense, gathered)]
    assert gathered_calls
    torch.testing.assert_close(logits[1].float(), logits[0].float(), rtol=0.02, atol=0.02)
    for (name, p), q in zip(dense.named_parameters(), gathered.parameters()):
        if p.grad is not None:
            assert q.grad.dtype == torch.float32, name
            scale = p.grad.abs().max().clamp_min(1e-6)
            assert (q.grad - p.grad).abs().max() <= 0.05 * scale, name
    gathered_calls.clear()


def test_autocast_bf16_model_gathers(gathered_calls):
    dense, gathered = (m.to(torch.bfloat16) for m in pair(lambda: tiny_model("llama")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [step(m, batch(3, 12), PER_SEQUENCE) for m in (dense, gathered)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0.02, atol=0.02)
    assert gathered_calls


def test_per_layer_masks_gather_per_layer(gathered_calls):
    dense, gathered = pair(lambda: tiny_model("llama"), reference=PaperReference(per_layer_masks=True),
                           sink_active_prob=0.2)
    assert_same_step(dense, gathered, batch(3, 12), PER_TOKEN)
    assert len(gathered_calls) == 2
