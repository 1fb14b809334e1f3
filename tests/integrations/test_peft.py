"""PEFT LoRA on a patched model: LoRA on attention and MLP, sinks trained fully, masks exact
through the LoRA path, then merge_and_unload -> remove_sinks -> a plain checkpoint."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_model
from transformers import AutoModelForCausalLM

from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask
from hf_memsinks.cli import audit
from hf_memsinks.integrations.peft import train_sinks
from hf_memsinks.layers.neurons import neuron_dim
from hf_memsinks.layers.projections import is_patched_projection
from hf_memsinks.layers.sink_parts import whole

TARGETS = {
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
ID = 42


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_lora_with_sinks_then_merge_and_remove(model_type, tmp_path):
    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
    model = get_memsink_model(tiny_model(model_type), cfg)
    projections = {n: m for n, m in model.named_modules() if is_patched_projection(m)}
    before = {n: m.weight.detach().clone() for n, m in projections.items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model_type],
                                                  lora_dropout=0.0, init_lora_weights=True))
    enabled = train_sinks(peft_model)
    assert len(enabled) >= len(projections)
    # the sinks' trainable tensors are the sinks' size: no gradient or optimizer state for the MLP
    sink_sizes = sum(sinks.numel() for m in projections.values() for _, sinks in m.general_and_sink_parts().values())
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in trainable.items() if "lora_" not in n) == sink_sizes
    assert not any(m.weight.requires_grad for m in projections.values())
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}

    x = batch(4, 10)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    for _ in range(3):
        peft_model(input_ids=x, labels=x, sequence_ids=torch.full((4,), ID)).loss.backward()
        opt.step()
        opt.zero_grad()

    active = sink_mask(torch.tensor([ID]), 32, 0.3)[0]
    for name, module in projections.items():
        dim = neuron_dim(module, module.memsink.role)
        general_before = module.split(before[name], dim)[0]  # frozen: the sinks move in their own parameters
        assert torch.equal(module.weight, general_before) and module.weight.shape == general_before.shape
        delta = whole(module, "weight") - before[name]
        general, sinks = module.split(delta, dim)
        assert general.abs().max() == 0, f"{name}: general neurons moved outside LoRA"
        moved = sinks.abs().amax(dim=1 - dim) > 0
        if module.memsink.role == "out" or module.memsink.chunks == 1:
            assert torch.equal(moved, active), name
    # LoRA on the output projection never sees inactive sinks: their lora_A input columns stay put
    down = "c_proj" if model_type == "gpt2" else "down_proj"
    checked = 0
    for name, param in peft_model.named_parameters():
        if f"mlp.{down}.lora_A" in name:
            cols = (param.detach() - lora_before[name])[:, 32:]
            assert cols.abs().amax(0).gt(0).equal(active), name
            checked += 1
    assert checked == 2

    peft_model.eval()
    probe = batch(2, 9, seed=5)
    with torch.no_grad():
        expected = peft_model(input_ids=probe).logits  # default eval mode: sinks dropped
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        peft_model.get_base_model().remove_sinks()
    plain = peft_model.merge_and_unload().remove_sinks()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=probe).logits, expected, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)
    assert audit(str(tmp_path)) == []
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=probe).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_model_in_trainer_keeps_sequence_ids(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_memsinks.data import MemSinkDataCollator

    model = get_memsink_model(tiny_model("llama"), MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS["llama"]))
    train_sinks(peft_model)
    sinks_before = model.sink_parameters()
    ds = Dataset.from_dict({"input_ids": batch(8, 10).tolist(), "sequence_ids": [7] * 8})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-2, disable_tqdm=True)
    Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=MemSinkDataCollator(pad_token_id=0)).train()
    after = model.sink_parameters()
    assert any(not torch.equal(after[k], sinks_before[k]) for k in after)


def test_lora_on_one_of_two_input_projections_runs_in_eval_and_removes_exactly():
    """The guide's targets (up_proj, not gate_proj): with sinks dropped, the adapter's output has
    every neuron, so the MLP's other input projection must compute every neuron too."""
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig.for_finetuning(sink_active_prob=0.3))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    train_sinks(peft_model)
    x = batch(4, 10)
    peft_model.train()(input_ids=x, labels=x, sequence_ids=torch.full((4,), ID)).loss.backward()
    peft_model.eval()
    probe = batch(2, 9, seed=5)
    with torch.no_grad():
        expected = peft_model(input_ids=probe).logits
        plain = peft_model.merge_and_unload().remove_sinks()
        torch.testing.assert_close(plain(input_ids=probe).logits, expected, atol=1e-5, rtol=1e-5)


def _lora_trainer_run(out, resume=None, weight_decay=0.0):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_memsinks.data import MemSinkDataCollator

    torch.manual_seed(0)
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False))
    train_sinks(peft_model)
    ds = Dataset.from_dict({"input_ids": batch(16, 10).tolist(), "sequence_ids": [7, 8, 9, 10] * 4})
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="steps", save_steps=2, learning_rate=1e-2,
                             weight_decay=weight_decay, disable_tqdm=True, seed=0)
    Trainer(model=peft_model, args=args, train_dataset=ds,
            data_collator=MemSinkDataCollator(pad_token_id=0)).train(resume_from_checkpoint=resume)
    return peft_model


def test_a_lora_runs_checkpoint_keeps_its_sinks_and_resumes_to_the_unbroken_run(tmp_path):
    """PEFT's adapter file holds the LoRA matrices only; with hf_memsinks it holds the sinks too,
    so resume_from_checkpoint continues the sinks instead of starting them over: to the unbroken run,
    weight decay on the sinks included."""
    from safetensors import safe_open

    straight = _lora_trainer_run(tmp_path / "a", weight_decay=0.1)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    sink_keys = [k for k in keys if ".sink_" in k]
    assert sink_keys and all(k.endswith((".sink_weight", ".sink_bias")) for k in sink_keys)
    assert not any("sink_part" in k for k in keys)
    assert audit(str(checkpoint))  # an adapter with sinks is memorized data: the audit flags it
    resumed = _lora_trainer_run(tmp_path / "b", resume=str(checkpoint), weight_decay=0.1)
    state, again = straight.state_dict(), resumed.state_dict()
    assert state.keys() == again.keys()
    for name in state:
        torch.testing.assert_close(again[name], state[name], atol=1e-6, rtol=1e-6, msg=name)
    # PeftModel.from_pretrained onto a fresh patched model (other random sinks) gives the saved sinks
    from peft import PeftModel

    torch.manual_seed(5)
    fresh = get_memsink_model(tiny_model("llama", seed=5), MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3))
    loaded = PeftModel.from_pretrained(fresh, str(checkpoint)).state_dict()
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        for key in sink_keys:
            assert torch.equal(loaded[key], f.get_tensor(key)), key
    # onto a model without sinks PEFT leaves them out: said, not silent
    with pytest.warns(UserWarning, match=r"holds \d+ sink tensors .* has no sinks: they are left out"):
        PeftModel.from_pretrained(tiny_model("llama"), str(checkpoint))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_merge_and_unmerge_keep_the_sinks_apart_in_the_same_parameters(model_type):
    """PEFT merges into the base's whole weight; the sinks stored apart go back apart after it,
    in the parameters an optimizer holds, with the adapter's share of the sink neurons in them."""
    model = get_memsink_model(tiny_model(model_type), MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model_type],
                                                  lora_dropout=0.0, init_lora_weights=False))
    train_sinks(peft_model)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    projections = [m for m in peft_model.modules() if is_patched_projection(m)]
    wholes = [whole(m, "weight").clone() for m in projections]
    probe = batch(2, 9, seed=5)
    peft_model.eval()
    with torch.no_grad(), model.sink_mode("activate", [ID, ID]):
        expected = peft_model(input_ids=probe).logits
        peft_model.merge_adapter()
        assert all(m.memsink.apart and m.weight.shape != w.shape for m, w in zip(projections, wholes))
        assert all(not torch.equal(whole(m, "weight"), w) for m, w in zip(projections, wholes))  # (merged in)
        torch.testing.assert_close(peft_model(input_ids=probe).logits, expected, atol=1e-5, rtol=1e-5)
        peft_model.unmerge_adapter()
        torch.testing.assert_close(peft_model(input_ids=probe).logits, expected, atol=1e-5, rtol=1e-5)
    for m, w in zip(projections, wholes):
        torch.testing.assert_close(whole(m, "weight"), w, atol=1e-6, rtol=0)
    assert {n: p for n, p in peft_model.named_parameters() if p.requires_grad} == trainable
    assert all(p.requires_grad for p in trainable.values())


def test_train_sinks_refuses_dora_on_a_sink_patched_projection():
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA reads its base's weight whole"):
        train_sinks(peft_model)
    on_attention = get_peft_model(get_memsink_model(tiny_model("llama"), MemSinkConfig(sink_fraction=0.5)),
                                  LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert train_sinks(on_attention)
