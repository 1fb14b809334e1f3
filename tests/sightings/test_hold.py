"""general_sightings over several epochs: a step in which every sighting is a repeat trains the
sinks only, and the optimizer must leave the general path exactly as it was
(hf_memsinks.integrations.optimizer.HoldGeneral): no momentum, weight decay or second-moment
decay on it, so that the general path is the one trained on the first sightings alone."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model
from hf_memsinks.sightings.routing import sink_masks


def trained(steps, arch="llama", optimizer="adamw", **config):
    """A patched tiny model after one optimizer step per ``(tokens, ids)`` in ``steps``."""
    torch.manual_seed(0)
    model = get_memsink_model(tiny_model(arch), MemSinkConfig(general_sightings=1, sightings_by="ids",
                                                               **config)).train()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9, weight_decay=0.1)
    attach_sink_lr(model, opt)
    for x, ids in steps:
        model(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def general_parts(model, opt):
    """Every parameter's general part (sink slices zeroed) and the same of its optimizer state."""
    masks = sink_masks(model)
    out = {}
    for name, p in model.named_parameters():
        keep = ~masks[id(p)] if id(p) in masks else torch.ones((), dtype=torch.bool)
        out[name] = p.detach() * keep
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                out[f"{name}/{key}"] = value * keep
    return out


def sink_parts(model):
    masks = sink_masks(model)
    return {name: p.detach() * masks[id(p)] for name, p in model.named_parameters() if id(p) in masks}


def batch(seed, ids):
    return torch.randint(3, VOCAB, (len(ids), 12), generator=torch.Generator().manual_seed(seed)), torch.tensor(ids)


@pytest.mark.parametrize("arch,optimizer", [("llama", "adamw"), ("gpt2", "adamw"), ("llama", "sgd")])
def test_repeat_only_steps_leave_the_general_path_and_its_optimizer_state_exactly(arch, optimizer):
    first, new = batch(1, [11, 12, 13, 14]), batch(2, [21, 22, 23, 24])
    once, opt_once = trained([first], arch, optimizer)
    epochs, opt_epochs = trained([first] * 6, arch, optimizer)  # 5 more epochs: every sighting a repeat
    assert opt_epochs._memsink_hold_general.held_steps == 5
    before, after = general_parts(once, opt_once), general_parts(epochs, opt_epochs)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    moved = [name for name, t in sink_parts(epochs).items() if not torch.equal(t, sink_parts(once)[name])]
    assert moved  # the repeats did train their sinks

    # and the next real step moves the general path exactly as if the repeat-only steps never ran
    once, opt_once = trained([first, new], arch, optimizer)
    epochs, opt_epochs = trained([first] * 6 + [new], arch, optimizer)
    before, after = general_parts(once, opt_once), general_parts(epochs, opt_epochs)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_step_with_one_first_sighting_trains_the_general_path():
    first = batch(1, [11, 12, 13, 14])
    mixed = batch(1, [11, 12, 13, 99])  # row 3 is a first sighting: the general path takes the step
    once, opt_once = trained([first])
    model, opt = trained([first, mixed])
    assert opt._memsink_hold_general.held_steps == 0
    before, after = general_parts(once, opt_once), general_parts(model, opt)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_steps_without_ids_train_the_general_path_and_are_not_held():
    first = batch(1, [11, 12, 13, 14])
    model, opt = trained([first])
    x, no_ids = batch(3, [-1, -1, -1, -1])
    model(input_ids=x, labels=x, sequence_ids=no_ids).loss.backward()  # rows without an ID: the general path
    opt.step()
    assert opt._memsink_hold_general.held_steps == 0


def test_training_without_the_hook_warns_that_the_general_path_moves():
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig(general_sightings=1, sink_lr_scale=1.0)).train()
    x, ids = batch(1, [1, 2])
    with pytest.warns(UserWarning, match="general_sightings"):
        model(input_ids=x, labels=x, sequence_ids=ids)


def test_a_forward_without_ids_trains_the_general_path_and_is_not_held():
    first = batch(1, [11, 12, 13, 14])
    model, opt = trained([first], require_sequence_ids=False)
    x = batch(3, [1, 2, 3, 4])[0]
    model(input_ids=x, labels=x).loss.backward()  # no sequence_ids at all: not routed, general neurons only
    opt.step()
    assert opt._memsink_hold_general.held_steps == 0
    model(input_ids=first[0], labels=first[0], sequence_ids=first[1]).loss.backward()  # repeats only
    opt.step()
    assert opt._memsink_hold_general.held_steps == 1
