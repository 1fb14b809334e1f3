"""Plain LoRA around the MLP's projections computes only the active sinks too
(layers/active_sinks_lora.py): with LoRA on every linear layer and the sinks trained stored apart
(train_sinks), the logits and every gradient equal the dense path's (the same model, deep-copied,
with compute_active_sinks_only off); any other adapter setup keeps the dense path."""

import copy
import pickle

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model, train_sinks
from hf_memsinks.layers.active_sinks import GatheredInput, GatheredOutput
from hf_memsinks.layers.projections import is_patched_projection

PER_SEQUENCE = torch.tensor([3, -1, 9])
PER_TOKEN = torch.tensor([[3] * 5 + [4] * 7, [-1] * 12, [7] * 4 + [-1] * 3 + [8] * 5])
MLP_OUT = {"gpt2": "mlp.c_proj", "llama": "down_proj", "phi3": "down_proj", "opt": "fc2"}


@pytest.fixture
def gathered_weights(monkeypatch):
    """The weights each gathered Function ran with: their ids and shapes (autocast hands it casts)."""
    seen = []
    for function in (GatheredInput, GatheredOutput):
        original = function.apply

        def spy(*args, _original=original):
            seen.extend([id(args[1]), tuple(args[1].shape)])
            return _original(*args)

        monkeypatch.setattr(function, "apply", spy)
    return seen


def with_lora(model_type, lora=None, sinks=True, **config):
    """A patched model computing only the active sinks, with LoRA (``lora``: LoraConfig overrides)
    and train_sinks; its trainable tensors randomised, so that every path carries a gradient."""
    model = get_memsink_model(tiny_model(model_type), MemSinkConfig.for_finetuning(**config))
    model.memsink.sink_lr_warned = True
    torch.manual_seed(0)
    settings = {"r": 4, "lora_alpha": 12, "target_modules": "all-linear", "lora_dropout": 0.0, **(lora or {})}
    model = get_peft_model(model, LoraConfig(**settings))
    if sinks:
        train_sinks(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return model


def dense_copy(model):
    dense = copy.deepcopy(model)
    dense.memsink.state.config.compute_active_sinks_only = False
    return dense


def step(model, x, ids, seed=None):
    model.train()
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = model(input_ids=x, labels=x, sequence_ids=ids)
    out.loss.backward()
    return out.logits.detach()


def assert_same_step(dense, gathered, x, ids, seed=None):
    torch.testing.assert_close(step(gathered, x, ids, seed), step(dense, x, ids, seed), rtol=1e-5, atol=1e-6)
    grads = 0
    for (name, p), q in zip(dense.named_parameters(), gathered.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            grads += 1
            scale = float(p.grad.abs().max())  # (float summation order: relative to the tensor's largest entry)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    assert grads


def mlp_lora_weights(model):
    """The LoRA weights the gathered path indexes by neuron: lora_B of the input projections, lora_A
    of the output projections."""
    out = []
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if is_patched_projection(base):
            lora = module.lora_B if base.memsink.role == "in" else module.lora_A
            out.append(lora["default"].weight)
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi3", "opt"])
@pytest.mark.parametrize("ids", [PER_SEQUENCE, PER_TOKEN], ids=["per_sequence", "per_token"])
def test_lora_everywhere_gathers_and_equals_the_dense_step(model_type, ids, gathered_weights):
    """gpt2: Conv1D; phi3: a fused gate+up (lora_B's rows in two chunks); opt: (B * T, ·) MLP input.
    The sinks no row activates get exactly zero gradient in lora_B's rows and lora_A's columns, as
    in the dense step."""
    gathered = with_lora(model_type)
    dense = dense_copy(gathered)
    assert_same_step(dense, gathered, batch(3, 12), ids)
    weights = mlp_lora_weights(gathered)
    assert {id(w) for w in weights} <= set(gathered_weights) and len(weights) >= 4
    for d, g in zip(mlp_lora_weights(dense), weights):
        assert torch.equal(d.grad == 0, g.grad == 0)
        assert (g.grad == 0).any()  # (the inactive sinks')


@pytest.mark.parametrize("lora", [{"use_rslora": True, "lora_alpha": 5}, {"target_modules": ["up_proj"]},
                                  {"target_modules": ["gate_proj", "down_proj"], "lora_bias": True}],
                         ids=["rslora", "one_input_projection", "lora_bias"])
def test_scalings_partial_targets_and_lora_bias(lora, gathered_weights):
    """Any scaling; LoRA on some projections of the MLP (the others gather as without it); lora_B's bias."""
    gathered = with_lora("llama", lora)
    assert_same_step(dense_copy(gathered), gathered, batch(3, 12), PER_TOKEN)
    assert {id(w) for w in mlp_lora_weights(gathered)} <= set(gathered_weights)


def test_without_train_sinks(gathered_weights):
    """Frozen sinks: LoRA's own gradients alone."""
    gathered = with_lora("gpt2", sinks=False)
    assert_same_step(dense_copy(gathered), gathered, batch(3, 12), PER_SEQUENCE)
    assert gathered_weights


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_lora_dropout_draws_as_the_dense_path_on_the_input_projections(model_type, gathered_weights):
    """Dropout on the projection's input, the adapter's own module: with the same seed before each
    forward, the same draws as the dense path wherever that input has the dense width (every linear
    layer but the MLP's output projection, which reads the gathered width)."""
    targets = {"gpt2": ["c_attn", "attn.c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj"]}[model_type]
    gathered = with_lora(model_type, {"lora_dropout": 0.3, "target_modules": targets})
    dense = dense_copy(gathered)
    assert_same_step(dense, gathered, batch(3, 12), PER_TOKEN, seed=5)
    assert {id(w) for w in mlp_lora_weights(gathered)} <= set(gathered_weights)


class ElementwiseDropout(torch.nn.Module):
    """A dropout whose draw is a function of each element's value (it drops the negative ones, and
    ``x * keep`` is continuous, so float summation order moves it by as little): where the dense
    path's input and the gathered one hold the same values, it drops the same ones."""

    def forward(self, x):
        return x * (x.detach() > 0) * 2


def test_lora_dropout_at_the_output_projection_is_applied_to_its_gathered_input(gathered_weights):
    gathered = with_lora("llama", {"lora_dropout": 0.3})
    widths = []
    for module in gathered.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = ElementwiseDropout()
            if is_patched_projection(module.base_layer) and module.base_layer.memsink.role == "out":
                module.lora_dropout["default"].register_forward_hook(lambda m, args, out: widths.append(out.shape[-1]))
    dense = dense_copy(gathered)
    assert_same_step(dense, gathered, batch(3, 12), PER_SEQUENCE)
    full = gathered.memsink.sites[0].general + gathered.memsink.sites[0].sinks
    assert len(widths) == 4 and max(widths[:2]) < full and widths[2:] == [full, full]  # gathered, then dense


def _two_active():
    model = with_lora("llama")
    model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0))
    model.base_model.set_adapter(["default", "other"])
    return model


def _merged():
    model = with_lora("llama")
    model.merge_adapter()
    return model


@pytest.mark.parametrize("build", [lambda: with_lora("llama", {"use_dora": True}, sinks=False), _two_active, _merged],
                         ids=["dora", "two_active_adapters", "merged"])
def test_other_adapter_setups_take_the_dense_path(build, gathered_weights):
    gathered = build()
    assert_same_step(dense_copy(gathered), gathered, batch(3, 12), PER_SEQUENCE)
    assert not gathered_weights


def test_disabled_adapters_and_other_adapter_types_take_the_dense_path(gathered_weights):
    gathered = with_lora("llama")
    dense = dense_copy(gathered)
    with gathered.disable_adapter(), dense.disable_adapter():
        assert_same_step(dense, gathered, batch(3, 12), PER_SEQUENCE)
    assert not gathered_weights
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig.for_finetuning())
    model.memsink.sink_lr_warned = True
    ia3 = get_peft_model(model, IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert_same_step(dense_copy(ia3), ia3, batch(3, 12), PER_SEQUENCE)
    assert not gathered_weights


def test_a_copy_or_pickle_after_training_steps_computes_with_its_own_modules(gathered_weights):
    """The wrappers' class and hooks are set at the first forward; a deep copy or a pickle made
    after it gathers with its own weights and masks (the original's are changed below)."""
    gathered = with_lora("gpt2")
    step(gathered, batch(3, 12), PER_TOKEN)
    copies = [copy.deepcopy(gathered), pickle.loads(pickle.dumps(gathered))]
    expected = step(copies[0], batch(3, 12, seed=2), PER_TOKEN)
    with torch.no_grad():
        for p in gathered.parameters():
            p.zero_()
    gathered_weights.clear()
    for model in copies:
        torch.testing.assert_close(step(model, batch(3, 12, seed=2), PER_TOKEN), expected, rtol=0, atol=0)
        assert {id(w) for w in mlp_lora_weights(model)} <= set(gathered_weights)
        assert type(model.base_model.model.transformer.h[0].mlp.c_fc).__name__ == "Linear"


def test_gradient_checkpointing_replays_the_gathered_lora_with_its_dropout(gathered_weights):
    gathered = with_lora("llama", {"lora_dropout": 0.2, "target_modules": ["q_proj", "gate_proj", "up_proj"]})
    gathered.gradient_checkpointing_enable({"use_reentrant": False})
    assert_same_step(dense_copy(gathered), gathered, batch(3, 12), PER_TOKEN, seed=3)
    assert {id(w) for w in mlp_lora_weights(gathered)} <= set(gathered_weights)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["autocast_fp32", "bf16_base"])
def test_autocast_and_adapters_in_another_dtype_than_the_base(base_dtype, gathered_weights):
    """Trainer(bf16=True) on fp32 weights; a bf16 base with PEFT's fp32 adapters (the input cast to
    the adapter's dtype, the output back to the base's): close to the dense path, each gradient in its
    parameter's dtype."""
    gathered = with_lora("llama")
    gathered.to(base_dtype)
    for name, p in gathered.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    dense = dense_copy(gathered)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base_dtype == torch.float32):
        logits = [step(m, batch(3, 12), PER_TOKEN) for m in (dense, gathered)]
    torch.testing.assert_close(logits[1].float(), logits[0].float(), rtol=0.02, atol=0.02)
    ran = {tuple(w.shape) for w in mlp_lora_weights(gathered)} if base_dtype == torch.float32 else \
        {id(w) for w in mlp_lora_weights(gathered)}
    assert ran <= set(gathered_weights)
    for (name, p), q in zip(dense.named_parameters(), gathered.parameters()):
        if p.grad is not None:
            assert q.grad.dtype == q.dtype == (torch.float32 if "lora_" in name else base_dtype), name
            scale = p.grad.float().abs().max().clamp_min(1e-6)
            assert (q.grad.float() - p.grad.float()).abs().max() <= 0.05 * scale, name


def test_after_merge_and_unload_the_projections_gather_on_their_own(gathered_weights):
    gathered = with_lora("llama")
    dense = dense_copy(gathered)
    assert_same_step(dense, gathered, batch(3, 12), PER_SEQUENCE)
    merged, dense = gathered.merge_and_unload(), dense.merge_and_unload()
    gathered_weights.clear()
    assert_same_step(dense, merged, batch(3, 12), PER_TOKEN)
    assert gathered_weights and not any(p.grad is not None and "lora_" in n for n, p in merged.named_parameters())
