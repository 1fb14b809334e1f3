"""``MemSinkConfig(sink_optimizer="rowwise")`` (integrations/rowwise_sinks.py): the sinks, stored apart,
step by one second moment per neuron, touched neurons only, at ``sink_lr_scale`` times the learning
rate, then the decoupled weight decay; the optimizer keeps no state for them; its state in the
optimizer's state dict resumes exactly; in a full fine-tune too, where the general neurons keep AdamW."""

import copy
import io

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_model
from transformers import Trainer, TrainingArguments

from hf_memsinks import MemSinkConfig, MemSinkDataCollator, attach_sink_lr, get_memsink_model, train_sinks
from hf_memsinks.layers.sink_parts import parts

CFG = MemSinkConfig.for_finetuning(sink_fraction=0.5, sink_active_prob=0.3, sink_lr_scale=5.0,
                                   sink_optimizer="rowwise")
IDS = torch.tensor([3, 4])


def with_sinks_apart(cfg=CFG):
    model = get_memsink_model(tiny_model("gpt2"), cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    train_sinks(model)
    return model.train()


def optimizer(model, decay=0.1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95),
                            weight_decay=decay)
    attach_sink_lr(model, opt)
    return opt


def backward(model, seed=1, ids=IDS):
    x = batch(2, 8, seed=seed)
    model(input_ids=x, labels=x, sequence_ids=ids).loss.backward()


def trained_by_trainer(model, tmp_path):
    """Two Trainer steps on 8 rows of two IDs; the optimizer it stepped with."""
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(3, 97, (8, 12), generator=g).tolist(),
                            "sequence_ids": [int(IDS[i % 2]) for i in range(8)]})
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=MemSinkDataCollator(pad_token_id=0))
    trainer.train()
    return trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer


def out_sinks(model):
    proj = model.transformer.h[0].mlp.c_proj  # Conv1D: its sinks along dim 0
    return parts(proj)["weight"]


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_the_first_step_moves_touched_neurons_by_their_normalised_gradient(decay):
    model = with_sinks_apart()
    opt = optimizer(model, decay)
    backward(model)
    sinks = out_sinks(model)
    before, grad = sinks.detach().clone(), sinks.grad.clone()
    rms = grad.pow(2).mean(1, keepdim=True).sqrt()
    touched = rms[:, 0] > 0
    assert 0 < touched.sum() < len(touched)  # (the IDs' sinks only)
    opt.step()
    lr = 1e-2 * 5.0
    want = (before - lr * grad / (rms + 1e-8)) * (1 - lr * decay)
    torch.testing.assert_close(sinks.detach(), want, rtol=1e-5, atol=1e-7)
    if decay == 0:
        assert torch.equal(sinks.detach()[~touched], before[~touched])
    state = opt.state[sinks]
    assert set(state) == {"step", "rowwise_sq", "rowwise_count"}  # AdamW kept nothing for the sinks
    assert torch.equal(state["rowwise_count"].bool(), touched) and sinks.grad is None


def test_a_neuron_moves_only_on_steps_that_touched_it():
    model = with_sinks_apart()
    opt = optimizer(model, decay=0.0)
    backward(model, ids=torch.tensor([3, 3]))
    opt.step()
    opt.zero_grad()
    sinks = out_sinks(model)
    first = opt.state[sinks]["rowwise_count"].clone()
    before = sinks.detach().clone()
    backward(model, seed=2, ids=torch.tensor([4, 4]))
    opt.step()
    count = opt.state[sinks]["rowwise_count"]
    moved = (sinks.detach() - before).abs().amax(1) > 0
    assert torch.equal(moved, count > first)  # this step's neurons, and no other
    assert (count <= 2).all() and moved.any()


def test_the_rules_state_resumes_from_the_optimizers_state_dict():
    model = with_sinks_apart()
    opt = optimizer(model)
    for seed in (1, 2):
        backward(model, seed=seed)
        opt.step()
        opt.zero_grad()
    resumed = copy.deepcopy(model)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95),
                             weight_decay=0.1)
    saved = io.BytesIO()  # (as a checkpoint holds it: loading the live dict would share its tensors)
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    opt2.load_state_dict(torch.load(saved))
    attach_sink_lr(resumed, opt2)
    for m, o in ((model, opt), (resumed, opt2)):
        backward(m, seed=3)
        o.step()
    torch.testing.assert_close(out_sinks(resumed), out_sinks(model), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_full_fine_tune_steps_its_sinks_apart_by_the_rule_and_the_rest_by_adamw(model_type, tmp_path):
    model = get_memsink_model(tiny_model(model_type), CFG)
    sinks = {n: p for n, p in model.named_parameters() if ".sink_part_" in n}
    assert sinks and all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inner = trained_by_trainer(model, tmp_path)
    for name, p in model.named_parameters():
        state = inner.state[p]
        assert ("rowwise_sq" in state and "exp_avg" not in state) if name in sinks else "exp_avg" in state, name
        assert not torch.equal(p.detach(), before[name]) or name in sinks, name  # (every general tensor moved)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in sinks.items())
    # the checkpoint format and removal are those of a model whose sinks share the weight
    state = model.state_dict()
    assert not any(".sink_part_" in k for k in state)
    joined = get_memsink_model(tiny_model(model_type), MemSinkConfig.for_finetuning(
        sink_fraction=0.5, sink_active_prob=0.3, sink_lr_scale=5.0))
    assert joined.load_state_dict(state).missing_keys == []
    x = batch(2, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().remove_sinks()(input_ids=x).logits,
                                   joined.eval().remove_sinks()(input_ids=x).logits, rtol=0, atol=0)


def test_training_without_the_rule_warns():
    model = with_sinks_apart(MemSinkConfig.for_finetuning(sink_optimizer="rowwise", sink_lr_scale=1.0))
    with pytest.warns(UserWarning, match="sink_optimizer='rowwise'"):
        backward(model)


def test_trainer_with_lora_steps_the_sinks_by_the_rule(tmp_path):
    model = get_memsink_model(tiny_model("gpt2"), CFG)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc", "c_proj"],
                                                  fan_in_fan_out=True))
    names = train_sinks(peft_model)
    assert names
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "sink_part" in n}
    inner = trained_by_trainer(peft_model, tmp_path)
    assert model.memsink.sink_rule_attached
    for name, p in peft_model.named_parameters():
        if "sink_part" in name:
            assert "exp_avg" not in inner.state[p] and "rowwise_sq" in inner.state[p], name
    assert any(not torch.equal(p.detach(), before[n]) for n, p in peft_model.named_parameters() if n in before)


def test_peft_sees_a_conv1d_projections_whole_width_with_its_sinks_apart_also_in_a_deep_copy():
    """PEFT reads a Conv1D's width from its weight (or the weight's ``ds_shape``): with the sinks apart
    the weight holds the general neurons only, so the patched projection keeps ``ds_shape`` whole."""
    model = copy.deepcopy(get_memsink_model(tiny_model("gpt2"), CFG))
    fc = model.transformer.h[0].mlp.c_fc
    width = fc.memsink.general + fc.memsink.sinks
    assert fc.weight.shape[1] < width  # (apart: the weight holds the general neurons)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True))
    train_sinks(peft_model)
    assert peft_model.base_model.model.transformer.h[0].mlp.c_fc.lora_B["default"].weight.shape[0] == width
    assert peft_model.base_model.model.transformer.h[0].mlp.c_proj.lora_A["default"].weight.shape[1] == width
    backward(peft_model)


def test_a_mixture_of_experts_model_is_refused_before_anything_changes():
    model = tiny_model("mixtral")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    width = model.config.intermediate_size
    with pytest.raises(ValueError, match="mixture-of-experts"):
        get_memsink_model(model, CFG)
    assert model.config.intermediate_size == width and not hasattr(model, "memsink")
    assert not any(hasattr(m, "memsink") for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert get_memsink_model(model, MemSinkConfig.for_finetuning(sink_optimizer="adamw"))  # (patchable as it was)


def test_frozen_sinks_stay_out_of_adapter_files_and_a_merge_keeps_what_trains():
    """With LoRA on attention and no train_sinks, the sinks (apart since patching) stay frozen: PEFT's
    adapter state leaves them out, as it leaves out the frozen base; merge and unmerge keep which
    parameters train."""
    from peft import get_peft_model_state_dict

    model = get_memsink_model(tiny_model("llama"), CFG)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and not any("sink_" in n for n in trainable)
    assert not any("sink_" in k for k in get_peft_model_state_dict(peft_model))
    backward(peft_model)  # (the first forward adopts the wrappers)
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable
    train_sinks(peft_model)
    assert any("sink_" in k for k in get_peft_model_state_dict(peft_model))


def test_an_adapter_loaded_from_a_folder_merges_before_any_forward(tmp_path):
    from peft import PeftModel

    model = get_memsink_model(tiny_model("llama"), CFG)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "down_proj"],
                                                  init_lora_weights=False))
    train_sinks(peft_model)
    peft_model.save_pretrained(tmp_path)
    x = batch(2, 9, seed=6)
    with torch.no_grad(), model.eval().sink_mode("activate", [3, 4]):
        expected = peft_model(input_ids=x).logits
    loaded = PeftModel.from_pretrained(get_memsink_model(tiny_model("llama"), CFG), tmp_path)
    merged = loaded.merge_and_unload()  # (no forward before it)
    with torch.no_grad(), merged.eval().sink_mode("activate", [3, 4]):
        torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
