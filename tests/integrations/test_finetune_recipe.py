"""Fine-tuning a pretrained model: the default config refuses to carve sinks out of pretrained
neurons, ``MemSinkConfig.for_finetuning()`` adds copied sinks without changing outputs, its sink
step scale is exact, and Trainer / MemSinkSFTTrainer move exactly the batch IDs' sinks; from-scratch
patching is what it was."""

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from tiny_models import batch, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from hf_memsinks import MemSinkConfig, MemSinkDataCollator, get_memsink_model, sink_mask
from hf_memsinks.integrations.optimizer import attach_sink_lr
from hf_memsinks.layers.neurons import neuron_dim
from hf_memsinks.layers.projections import is_patched_projection

IDS = (11, 22)


def pretrained(tmp_path, model_type="gpt2"):
    tiny_model(model_type).save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base")


def test_default_config_refuses_a_pretrained_model(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained weights.*for_finetuning\(\)"):
        get_memsink_model(pretrained(tmp_path), MemSinkConfig())
    with pytest.warns(UserWarning, match="pretrained MLP neurons become sinks"):
        get_memsink_model(pretrained(tmp_path), MemSinkConfig(mode="split"))


def test_auto_mode_from_scratch_is_split(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "base")  # a checkpoint's config, fresh weights: from scratch
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "base"))
    assert get_memsink_model(fresh, MemSinkConfig()).memsink_config.mode == "split"
    auto = get_memsink_model(tiny_model("gpt2"), MemSinkConfig())
    split = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(mode="split"))
    assert auto.memsink_config == split.memsink_config and auto.memsink_config.mode == "split"
    x = batch(2, 8)
    assert torch.equal(auto.eval()(input_ids=x).logits, split.eval()(input_ids=x).logits)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_recipe_adds_copied_sinks_and_removal_gives_the_original(model_type, tmp_path):
    base = pretrained(tmp_path, model_type)
    x = batch(2, 8)
    want = base.eval()(input_ids=x).logits
    model = get_memsink_model(copy.deepcopy(base), MemSinkConfig.for_finetuning())
    cfg = model.memsink_config
    assert cfg.mode == "add" and cfg.sink_init == "copy"
    model.train()
    got = model(input_ids=x, sequence_ids=torch.tensor(IDS)).logits  # sinks active, output weights zero
    assert torch.allclose(got, want, atol=1e-6)
    for module in model.modules():
        if is_patched_projection(module) and module.memsink.role == "in":
            general, sinks = module.general_and_sink_parts()["weight"]
            dim = neuron_dim(module, "in")
            rows = [general.select(dim, i) for i in range(general.shape[dim])]
            assert all(any(torch.equal(sinks.select(dim, j), r) for r in rows) for j in range(sinks.shape[dim]))
    plain = model.eval().remove_sinks()
    assert type(plain) is type(base) and plain.config.to_dict() == base.config.to_dict()
    assert torch.equal(plain(input_ids=x).logits, want)


def test_sink_lr_scale_multiplies_exactly_the_sinks_step():
    steps = {}
    for scale in (1.0, 3.0):
        model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(mode="add", sink_lr_scale=scale))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        assert (attach_sink_lr(model, opt) is None) == (scale == 1.0)
        proj = model.transformer.h[0].mlp.c_proj  # (the input rows of new sinks get no gradient at first)
        before = [t.clone() for t in proj.general_and_sink_parts()["weight"]]
        model.train()
        x = batch(2, 8)
        model(input_ids=x, labels=x, sequence_ids=torch.tensor(IDS)).loss.backward()
        opt.step()
        steps[scale] = [a - b for a, b in zip(proj.general_and_sink_parts()["weight"], before)]
    assert torch.equal(steps[3.0][0], steps[1.0][0])  # general: the optimizer's own step
    assert steps[1.0][1].abs().max() > 0
    assert torch.allclose(steps[3.0][1], 3 * steps[1.0][1], atol=1e-7)


def test_training_without_the_hook_warns_once():
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig.for_finetuning()).train()
    x = batch(2, 8)
    with pytest.warns(UserWarning, match="sink_lr_scale"):
        model(input_ids=x, sequence_ids=torch.tensor(IDS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=x, sequence_ids=torch.tensor(IDS))


def sink_columns(model):
    return {n: m.general_and_sink_parts()["weight"][1].detach().clone() for n, m in model.named_modules()
            if is_patched_projection(m) and m.memsink.role == "out"}


def check_moved(model, before, sinks):
    want = sink_mask(torch.tensor(IDS), sinks, model.memsink_config.sink_active_prob).any(0)
    assert 0 < want.sum() < sinks
    for name, old in before.items():
        new = dict(model.named_modules())[name].general_and_sink_parts()["weight"][1]
        moved = (new - old).abs().amax(1 - neuron_dim(dict(model.named_modules())[name], "out")) > 0
        assert torch.equal(moved, want), name


def test_any_trainer_with_the_recipe_moves_only_the_batch_ids_sinks(tmp_path):
    # (no MemSinkCallback: every Trainer gets SinkLRCallback)
    model = get_memsink_model(pretrained(tmp_path), MemSinkConfig.for_finetuning(sink_active_prob=0.2))
    before = sink_columns(model)
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(3, 97, (8, 12), generator=g).tolist(),
                            "sequence_ids": [IDS[i % 2] for i in range(8)]})
    args = TrainingArguments(str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=3e-3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sink_lr_scale.*")
        Trainer(model=model, args=args, train_dataset=ds, data_collator=MemSinkDataCollator(pad_token_id=0)).train()
    assert model.memsink.sink_lr_attached
    check_moved(model, before, model.memsink.sites[0].sinks)


def test_sft_trainer_with_the_recipe_moves_only_the_batch_ids_sinks(tmp_path):
    from test_sft import IDS as SFT_IDS
    from test_sft import patched_llama, text_dataset, train

    assert SFT_IDS == IDS
    base = patched_llama().remove_sinks()
    base.save_pretrained(tmp_path / "base")
    model = get_memsink_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                              MemSinkConfig.for_finetuning(sink_active_prob=0.2))
    before = sink_columns(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sink_lr_scale.*")
        train(model, text_dataset(IDS), tmp_path / "out", args={"bf16": False})  # no bf16 accelerator state left
    assert model.memsink.sink_lr_attached
    check_moved(model, before, model.memsink.sites[0].sinks)


class _AdamWSubclass(torch.optim.AdamW):
    """Not Adam itself: SinkLR saves the sinks before its step and scales the difference."""


class _AdamSubclass(torch.optim.Adam):
    """As above, for Adam."""


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("options", [dict(weight_decay=0.1), dict(amsgrad=True, weight_decay=0.0),
                                     dict(maximize=True, weight_decay=0.05), dict(foreach=True), dict(fused=True),
                                     dict(adam=True, weight_decay=0.05), dict(general_sightings=1)])
def test_adam_sink_step_is_scaled_in_place_as_the_saved_copy_would(model_type, options):
    options = dict(options)
    adam, sightings = options.pop("adam", False), options.pop("general_sightings", None)
    runs = []  # Adam itself (the sinks' step scaled in place), its subclass (the saved copy), no scale
    for cls, scale in [(torch.optim.Adam if adam else torch.optim.AdamW, 7.0),
                       (_AdamSubclass if adam else _AdamWSubclass, 7.0), (torch.optim.AdamW, 1.0)]:
        model = get_memsink_model(tiny_model(model_type), MemSinkConfig(mode="add", sink_lr_scale=scale,
                                                                        sink_active_prob=0.5, sink_init="copy",
                                                                        general_sightings=sightings))
        opt = cls(model.parameters(), lr=1e-2, **options)
        runs.append((model.train(), opt, attach_sink_lr(model, opt)))
    (scaled, opt, hook), (reference, ref_opt, ref_hook), (unscaled, plain_opt, _) = runs
    scale_moved = 0.0
    # (under general_sightings=1 the last step sees only IDs seen before: the general path is held,
    # its step count set back)
    for step, ids in enumerate([(11, 22), (22, 33), (11, 44), (22, 44)]):
        # each step from the same weights and optimizer state (Adam magnifies float noise in gradients
        # that are zero in exact arithmetic, such as GPT-2's key bias)
        for model, optimizer in [(reference, ref_opt), (unscaled, plain_opt)]:
            model.load_state_dict(scaled.state_dict())
            optimizer.load_state_dict(copy.deepcopy(opt.state_dict()))  # (else it shares the tensors)
        x = batch(2, 8, seed=step)
        for model, optimizer, h in runs:
            optimizer.param_groups[0]["lr"] = 1e-2 / (step + 1)  # (a schedule: each step's own lr is used)
            torch.manual_seed(step)  # (the same dropout)
            model(input_ids=x, labels=x, sequence_ids=torch.tensor(ids)).loss.backward()
            if h is not None:
                h.before(optimizer)
                saved = {old is not None for *_, old in h._pending}
                assert saved == ({False} if h is hook else {True})  # no copy of the sinks under Adam itself
            optimizer.step()
            optimizer.zero_grad()
        for (name, a), b in zip(scaled.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        sinks = [(m.general_and_sink_parts()["weight"][1], n.general_and_sink_parts()["weight"][1])
                 for m, n in zip(scaled.modules(), unscaled.modules()) if is_patched_projection(m)]
        scale_moved = max([scale_moved] + [float((a - b).abs().max().detach()) for a, b in sinks])
    assert scale_moved > 1e-3  # (the scale is not a no-op)
    assert getattr(opt, "_memsink_hold_general", None) is None or opt._memsink_hold_general.held_steps == 1
