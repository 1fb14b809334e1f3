"""MemSinkConfig.sinks_from_sighting: a document's first K-1 sightings train as rows without an ID
(general path, no sink on), later ones as the paper's method (hf_memsinks.sightings.later_sinks)."""

import copy
import dataclasses
import warnings

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model
from hf_memsinks.sightings.later_sinks import later_sighting_ids


def _pair(k: int, **config):
    """A model with ``sinks_from_sighting=k`` and its twin with the paper's setting, in training mode."""
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sinks_from_sighting=k, **config)).train()
    twin = copy.deepcopy(model)
    twin.memsink.config = dataclasses.replace(twin.memsink.config, sinks_from_sighting=1)
    return model, twin


def _step(model, x, ids):
    model.zero_grad()
    out = model(input_ids=x, labels=x, sequence_ids=torch.tensor(ids))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k, given, seen_as", [
    (2, [[5, 6], [5, 7], [6, 6]], [[-1, -1], [5, -1], [6, 6]]),
    (3, [[5, 5], [5, 8], [8, 5]], [[-1, -1], [5, -1], [-1, 5]]),
])
def test_early_sightings_train_exactly_as_rows_without_an_id(k, given, seen_as):
    model, twin = _pair(k)
    for step, (ids, expected) in enumerate(zip(given, seen_as)):
        x = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(step))
        logits, grads = _step(model, x, ids)
        want_logits, want = _step(twin, x, expected)
        assert torch.equal(logits, want_logits)
        assert grads.keys() == want.keys() and all(torch.equal(grads[n], want[n]) for n in grads)
        if ids != expected:  # (the twin given the IDs as they came trains otherwise: the test can fail)
            assert not torch.equal(_step(copy.deepcopy(twin), x, ids)[0], logits)


def test_packed_rows_count_each_documents_stretch():
    model, twin = _pair(2)
    x = torch.randint(3, VOCAB, (1, 8))
    first = torch.tensor([[4, 4, 4, 9, 9, 9, -1, -1]])
    again = torch.tensor([[9, 9, 9, 9, 2, 2, 2, 2]])
    for ids, expected in ((first, torch.full_like(first, -1)), (again, torch.tensor([[9, 9, 9, 9, -1, -1, -1, -1]]))):
        model.zero_grad()
        twin.zero_grad()
        got = model(input_ids=x, sequence_ids=ids).logits
        assert torch.equal(got, twin(input_ids=x, sequence_ids=expected).logits)
    assert dict(zip(*(t.tolist() for t in (model.memsink.routing.sightings.ids,
                                           model.memsink.routing.sightings.counts)))) == {2: 1, 4: 1, 9: 2}


def test_one_count_per_training_forward_and_none_in_eval():
    model, _ = _pair(2)
    x = torch.randint(3, VOCAB, (2, 8))
    model.eval()(input_ids=x, sequence_ids=torch.tensor([1, 2]))
    assert model.memsink.routing is None
    model.train()(input_ids=x, sequence_ids=torch.tensor([1, 2]))  # (its backbone joins the call: one count)
    model.base_model(input_ids=x, sequence_ids=torch.tensor([1, 3]))  # a fused LM head calls the backbone alone
    table = model.memsink.routing.sightings
    assert table.ids.tolist() == [1, 2, 3] and table.counts.tolist() == [2, 1, 1]


def test_a_training_forward_without_gradients_neither_counts_nor_drops_ids():
    """A trainer's extra pass for metrics (TRL's, under torch.no_grad) is not a sighting."""
    model, twin = _pair(2)
    x = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        got = model(input_ids=x, sequence_ids=torch.tensor([5, 6])).logits
        assert torch.equal(got, twin(input_ids=x, sequence_ids=torch.tensor([5, 6])).logits)
    assert model.memsink.routing is None


@pytest.mark.parametrize("by, later", [("ids+content", [9, 5]), ("ids", [-1, 5]), ("content", [9, -1])])
def test_what_counts_as_a_repeat_follows_sightings_by(by, later):
    """Tokens x under ID 5, x again under ID 9 (wrong metadata), then new tokens y under ID 5: a repeat by
    its content, by its ID, or (the default) by either."""
    model, _ = _pair(2, sightings_by=by)
    x, y = torch.randint(3, VOCAB, (2, 1, 8))
    seen = [int(later_sighting_ids(model.memsink, torch.tensor([i]), tokens, None))
            for i, tokens in ((5, x), (9, x), (5, y))]
    assert seen == [-1, *later]


def test_training_without_the_hook_that_keeps_the_counts_warns():
    model, _ = _pair(2, sink_lr_scale=1.0)
    x = torch.randint(3, VOCAB, (2, 8))
    with pytest.warns(UserWarning, match="sinks_from_sighting the sightings' counts are not saved"):
        model(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2]))
    hooked, _ = _pair(2, sink_lr_scale=1.0)
    attach_sink_lr(hooked, torch.optim.AdamW(hooked.parameters()))
    assert hooked.memsink.counts_kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hooked(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2]))


def test_sharded_parameters_are_refused():
    """FSDP's sharded optimizer state dict raises on the counts' key: refused when the hooks attach."""
    model, _ = _pair(2)
    next(model.parameters()).full_tensor = lambda: None  # (what a DTensor of FSDP2 has)
    with pytest.raises(ValueError, match="under FSDP"):
        attach_sink_lr(model, torch.optim.AdamW(model.parameters()))
    privacy = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1))
    next(privacy.parameters()).full_tensor = lambda: None
    with pytest.raises(ValueError, match="under FSDP"):
        attach_sink_lr(privacy, torch.optim.AdamW(privacy.parameters()))


def test_settings():
    for bad in (0, -1, 1.5, "2", True, 2**63):
        with pytest.raises(ValueError, match="sinks_from_sighting"):
            MemSinkConfig(sinks_from_sighting=bad)
    with pytest.raises(ValueError, match="sinks_from_sighting.*general_sightings"):
        MemSinkConfig(general_sightings=1, sinks_from_sighting=2)
    assert MemSinkConfig.for_finetuning().sinks_from_sighting == 1
    config = MemSinkConfig.for_finetuning(sinks_from_sighting=3)
    assert MemSinkConfig.from_dict(config.to_dict()) == config
