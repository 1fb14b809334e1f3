"""The plain Trainer end to end: dataset -> IDs -> collator -> train/eval -> resume -> export -> Hub folder."""

import json

import pytest
import torch
from datasets import Dataset
from tiny_models import CHECKPOINTING_ARG, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask
from hf_memsinks.cli import audit
from hf_memsinks.data import MemSinkDataCollator, add_sequence_ids
from hf_memsinks.integrations.trainer import MemSinkCallback
from hf_memsinks.layers.neurons import neuron_dim
from hf_memsinks.layers.projections import is_patched_projection

CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)


def token_dataset(n=24, length=12, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    ds = Dataset.from_dict({"input_ids": torch.randint(3, 97, (n, length), generator=g).tolist()})
    if ids is None:
        return add_sequence_ids(ds, by="content")
    return ds.add_column("sequence_ids", [ids] * n)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=2,
                seed=0, data_seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def moved_sinks(model, before):
    for name, module in model.named_modules():
        if is_patched_projection(module):
            dim = neuron_dim(module, module.memsink.role)
            delta = (module.weight - before[f"{name}.weight"]).narrow(dim, module.memsink.general, module.memsink.sinks)
            yield name, delta.abs().amax(dim=1 - dim) > 0


def test_train_and_eval_losses_reported_and_sinks_exported(tmp_path):
    model = get_memsink_model(tiny_model("gpt2"), CFG)
    export = tmp_path / "clean"
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3),
                      train_dataset=token_dataset(), eval_dataset=token_dataset(8, seed=1),
                      data_collator=MemSinkDataCollator(pad_token_id=0), callbacks=[MemSinkCallback(export)])
    trainer.train()
    history = trainer.state.log_history
    assert any("loss" in h for h in history) and any("eval_loss" in h for h in history)
    assert all(torch.isfinite(torch.tensor(h["eval_loss"])) for h in history if "eval_loss" in h)
    stats = [h for h in history if "memsink/sink_weight_norm" in h]
    assert stats and stats[-1]["memsink/sink_weight_norm"] > 0
    # the trained model keeps its sinks; the export is a plain model with the eval-mode logits
    assert hasattr(model, "memsink_config")
    assert audit(str(export)) == []
    plain = GPT2LMHeadModel.from_pretrained(export)
    x = torch.randint(3, 97, (2, 10))
    torch.testing.assert_close(plain(x).logits, model.eval()(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_one_id_moves_only_its_sinks(tmp_path, checkpointing):
    model = get_memsink_model(tiny_model("llama"), CFG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args(tmp_path, max_steps=2, optim="sgd", learning_rate=0.1,
                                   **{CHECKPOINTING_ARG: checkpointing}),
            train_dataset=token_dataset(ids=42), data_collator=MemSinkDataCollator(pad_token_id=0)).train()
    expected = sink_mask(torch.tensor([42]), 32, 0.3)[0]
    names = [name for name, moved in moved_sinks(model, before) if torch.equal(moved, expected)]
    assert len(names) == 6, names  # gate, up, down in 2 layers


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path):
    data = token_dataset(32)

    def run(out, resume=None, max_steps=6):
        torch.manual_seed(0)
        model = get_memsink_model(tiny_model("gpt2"), CFG)
        trainer = Trainer(model=model, args=args(out, max_steps=max_steps, save_strategy="steps", save_steps=3),
                          train_dataset=data, data_collator=MemSinkDataCollator(pad_token_id=0))
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert json.loads((checkpoint / "memsink_config.json").read_text())["sink_fraction"] == 0.5
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)
    assert straight.sink_parameters().keys() == resumed.sink_parameters().keys()


def test_training_without_ids_fails_clearly(tmp_path):
    model = get_memsink_model(tiny_model("gpt2"), CFG)
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "labels": [[5, 6, 7, 8]] * 4})
    with pytest.raises(ValueError, match="needs sequence_ids"):
        Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=ds).train()


def test_push_to_hub_uploads_only_a_folder_that_passes_the_audit(tmp_path, monkeypatch):
    """Intercepted at huggingface_hub's commit step: the sink-free model's push passes the audit;
    the same call on a model that still has sinks uploads nothing (tests/publishing/test_pushes.py has
    every other path)."""
    from fake_hub import intercept_hub

    from hf_memsinks import SinkUploadError

    hub = intercept_hub(monkeypatch)
    seen = {}
    save = GPT2LMHeadModel.save_pretrained

    def save_and_audit(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)
        seen["audit"] = audit(str(directory))

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", save_and_audit)
    model = get_memsink_model(tiny_model("gpt2"), CFG).remove_sinks()
    model.push_to_hub("me/clean-model")
    assert "model.safetensors" in hub.files("me/clean-model") and seen["audit"] == []
    dirty = get_memsink_model(tiny_model("gpt2"), CFG)
    with pytest.raises(SinkUploadError, match="remove_sinks"):
        dirty.push_to_hub("me/dirty-model")
    assert "me/dirty-model" not in hub.repos and hub.sink_tensors() == []


def test_add_mode_finetune_returns_original_width(tmp_path):
    """Fine-tune a saved pretrained-shaped checkpoint with added sinks through Trainer."""
    base_dir = tmp_path / "pretrained"
    tiny_model("llama").save_pretrained(base_dir)
    from hf_memsinks import AutoMemSinkModelForCausalLM

    model = AutoMemSinkModelForCausalLM.from_pretrained(
        base_dir, memsink_config=MemSinkConfig(mode="add", num_sink_neurons=16, sink_active_prob=0.5))
    assert model.model.layers[0].mlp.up_proj.weight.shape == (64 + 16, 32)  # the config keeps the general width
    Trainer(model=model, args=args(tmp_path, max_steps=3), train_dataset=token_dataset(),
            data_collator=MemSinkDataCollator(pad_token_id=0)).train()
    plain = model.remove_sinks()
    plain.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config.intermediate_size == tiny_config("llama").intermediate_size == 64
    assert again.model.layers[0].mlp.down_proj.weight.shape == (32, 64)
