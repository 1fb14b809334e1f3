"""TRL's SFTTrainer with its defaults (fused LM head on): text, conversational with assistant-only
loss, padding-free packing and LoRA each move exactly the sinks of the batches' IDs; rows with ID
-1 move none. DPO, which has no sequence IDs, is refused with the clear error."""

import copy
import dataclasses
import math
import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask
from hf_memsinks.integrations.sft import MemSinkSFTTrainer, SequenceIdCollator
from hf_memsinks.layers.projections import is_patched_projection

WORDS = [f"w{i}" for i in range(60)]
SPECIAL = ["<pad>", "<eos>", "<u>", "<a>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<a> {% generation %}{{ m['content'] }} <eos>"
    "{% endgeneration %}{% else %}<u> {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a> {% endif %}"
)
CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
IDS = (11, 22)


def tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   chat_template=CHAT_TEMPLATE)


def patched_llama(memsink_config=CFG):
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  vocab_size=len(SPECIAL) + len(WORDS), max_position_embeddings=128,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return get_memsink_model(AutoModelForCausalLM.from_config(config), memsink_config)


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def text_dataset(ids, n=8):
    rng = random.Random(0)
    return Dataset.from_dict({"text": [sentence(rng, rng.randint(6, 14)) for _ in range(n)],
                              "sequence_ids": [ids[i % len(ids)] for i in range(n)]})


def chat_dataset(ids, n=8):
    rng = random.Random(1)
    messages = [[{"role": "user", "content": sentence(rng, 5)}, {"role": "assistant", "content": sentence(rng, 7)}]
                for _ in range(n)]
    return Dataset.from_dict({"messages": messages, "sequence_ids": [ids[i % len(ids)] for i in range(n)]})


def train(model, dataset, tmp_path, **config):
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                     **{"max_length": 64, **config.pop("args", {})})
    trainer = MemSinkSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer(),
                                **config)
    trainer.train()
    return trainer


def moved(before):
    """Per output projection: which sink columns changed, and whether any general column did."""
    out = {}
    for name, (module, g0, s0) in before.items():
        general, sinks = module.general_and_sink_parts()["weight"]
        out[name] = ((sinks - s0).abs().amax(0) > 0, bool((general - g0).abs().max() > 0))
    return out


def snapshot(model):
    return {n: (m, *(t.detach().clone() for t in m.general_and_sink_parts()["weight"]))
            for n, m in model.named_modules() if is_patched_projection(m) and m.memsink.role == "out"}


def expected(ids):
    real = [i for i in ids if i >= 0]
    if not real:
        return torch.zeros(32, dtype=torch.bool)
    return sink_mask(torch.tensor(real), 32, CFG.sink_active_prob).any(0)


CASES = {
    "text": (text_dataset, {}),
    "messages_assistant_only": (chat_dataset, {"args": {"assistant_only_loss": True}}),
    "packing": (text_dataset, {"args": {"packing": True, "max_length": 40}}),
    "lora": (text_dataset, {"peft_config": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj", "down_proj"])}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sft_trainer_moves_exactly_the_batch_ids_sinks(case, tmp_path):
    make, config = CASES[case]
    model = patched_llama()
    before = snapshot(model)
    train(model, make(IDS), tmp_path, **dict(config))
    assert "forward" in model.__dict__  # TRL's fused LM head is on: it calls the backbone directly
    want = expected(IDS)
    assert 0 < want.sum() < 32  # the check can tell the batch IDs' sinks from all sinks
    for name, (sinks, general) in moved(before).items():
        assert torch.equal(sinks, want), f"{case}: {name} moved sinks {sinks.nonzero().flatten().tolist()}"
        assert general == (case != "lora"), name  # with LoRA, general neurons change only through the adapter


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_routes_sightings_under_the_privacy_setting(packing, tmp_path):
    """general_sightings: TRL's fused LM head cannot route, so the step takes the model's forward;
    every row (or packed stretch) is counted once, and the first sightings move no sink."""
    model = patched_llama(dataclasses.replace(CFG, general_sightings=1))
    before = snapshot(model)
    args = {"packing": True, "max_length": 40} if packing else {}
    trainer = train(model, text_dataset(IDS), tmp_path, args=args)
    sightings = model.memsink.routing.sightings
    assert sightings.ids.tolist() == sorted(IDS)
    if not packing:  # 2 steps x 4 rows, IDs alternating: each ID seen 4 times
        assert sightings.counts.tolist() == [4, 4]
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    for name, (sinks, general) in moved(before).items():
        assert general, name  # the first sightings trained the general path
        assert sinks.any() and torch.equal(sinks & ~expected(IDS), torch.zeros_like(sinks)), name


def test_the_trained_model_runs_after_remove_sinks(tmp_path):
    """MemSinkSFTTrainer leaves TRL's and accelerate's forward wrappers on the instance: removal in
    the same process still gives a plain model whose logits are the default eval mode's."""
    model = patched_llama()
    train(model, text_dataset(IDS), tmp_path)
    x = torch.tensor([tokenizer()(text_dataset(IDS)["text"][0])["input_ids"]])
    with torch.no_grad():
        before = model.eval()(input_ids=x).logits
        torch.testing.assert_close(model.remove_sinks()(input_ids=x).logits, before)


def test_sft_rows_without_sequence_move_no_sink(tmp_path):
    model = patched_llama()
    before = snapshot(model)
    train(model, text_dataset((-1,)), tmp_path)
    for name, (sinks, general) in moved(before).items():
        assert not sinks.any() and general, name


def test_packed_batches_carry_each_documents_ids(tmp_path):
    model = patched_llama()
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=40, per_device_train_batch_size=2,
                     report_to=[], use_cpu=True)
    trainer = MemSinkSFTTrainer(model=model, args=args, train_dataset=text_dataset((11, 22, 33), n=9),
                                processing_class=tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    ids, positions = batch["sequence_ids"], batch["position_ids"]
    assert ids.shape == positions.shape == batch["input_ids"].shape and ids.shape[0] == 1  # padding-free row
    starts = (positions[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
    assert len(starts) > 2
    for a, b in zip(starts, starts[1:]):  # one ID per packed document, constant within it
        assert ids[0, a:b].unique().numel() == 1 and int(ids[0, a]) in (11, 22, 33)


def test_plain_sft_trainer_stops_instead_of_training_general_neurons_only(tmp_path):
    from trl import SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, disable_tqdm=True)
    trainer = SFTTrainer(model=patched_llama(), args=args, train_dataset=text_dataset(IDS),
                         processing_class=tokenizer())
    with pytest.raises(ValueError, match="needs sequence_ids"):  # its fused head calls the backbone without IDs
        trainer.train()


def test_sft_without_ids_column_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="add_sequence_ids"):
        train(patched_llama(), text_dataset((1,)).remove_columns("sequence_ids"), tmp_path)


def test_sft_needs_a_patched_model(tmp_path):
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match="get_memsink_model"):
        train(AutoModelForCausalLM.from_config(config), text_dataset(IDS), tmp_path)


def test_collator_ids_follow_examples():
    inner = lambda examples: {"input_ids": torch.zeros(len(examples), 5, dtype=torch.long)}  # noqa: E731
    collate = SequenceIdCollator(inner)
    batch = collate([{"input_ids": [1, 2, 3], "sequence_ids": 7}, {"input_ids": [4, 5], "sequence_ids": 9}])
    assert batch["sequence_ids"].tolist() == [7, 9]
    batch = collate([{"input_ids": [1, 2, 3], "sequence_ids": [7, 7, 8]}, {"input_ids": [4, 5], "sequence_ids": 9}])
    assert batch["sequence_ids"].tolist() == [[7, 7, 8, -1, -1], [9, 9, -1, -1, -1]]
    assert "sequence_ids" not in collate([{"input_ids": [1]}, {"input_ids": [2]}])
    with pytest.raises(TypeError, match="example 1.*5.7"):  # the library's one ID validation
        collate([{"input_ids": [1], "sequence_ids": 3}, {"input_ids": [2], "sequence_ids": 5.7}])
    with pytest.raises(ValueError, match="example 0.*-100"):
        collate([{"input_ids": [1], "sequence_ids": -100}, {"input_ids": [2], "sequence_ids": 4}])


def test_dpo_trainer_is_refused_with_the_sequence_ids_error(tmp_path):
    from trl import DPOConfig, DPOTrainer

    rng = random.Random(2)
    data = Dataset.from_dict({"prompt": [sentence(rng, 4) for _ in range(4)],
                              "chosen": [sentence(rng, 5) for _ in range(4)],
                              "rejected": [sentence(rng, 5) for _ in range(4)]})
    model = patched_llama()
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                         processing_class=tokenizer())
    with pytest.raises(ValueError, match="needs sequence_ids"):
        trainer.train()


def test_push_to_hub_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    """Before the repository is created, not after the first save; a MemSinkCallback with an
    export takes the pushes over and publishes only the sink-free model."""
    from fake_hub import intercept_hub

    from hf_memsinks import MemSinkCallback, SinkUploadError

    hub = intercept_hub(monkeypatch)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, save_strategy="steps", save_steps=1, disable_tqdm=True, max_length=64,
                     push_to_hub=True, hub_model_id="me/sft")
    with pytest.raises(SinkUploadError, match="MemSinkSFTTrainer"):
        MemSinkSFTTrainer(model=patched_llama(), args=args, train_dataset=text_dataset(IDS),
                          processing_class=tokenizer())
    assert hub.created == []
    trainer = MemSinkSFTTrainer(model=patched_llama(), args=args, train_dataset=text_dataset(IDS),
                                processing_class=tokenizer(), callbacks=[MemSinkCallback(tmp_path / "export")])
    trainer.train()
    assert "model.safetensors" in hub.files("me/sft") and "tokenizer.json" in hub.files("me/sft")
    assert hub.sink_tensors() == [] and hub.memsink_files() == []
