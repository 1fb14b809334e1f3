"""MemSinkConfig.general_sightings: a document's first sightings train the general path with no sink
on, later sightings only its own sinks (hf_memsinks.model.routing), counted exactly
(hf_memsinks.ids.sightings)."""

import collections
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_models import VOCAB, tiny_model
from transformers import Trainer, TrainingArguments

from hf_memsinks import MemSinkConfig, get_memsink_model
from hf_memsinks.data import MemSinkDataCollator, add_sequence_ids
from hf_memsinks.ids.sightings import Sightings
from hf_memsinks.model.routing import Routing, content_keys, first_sightings, sink_masks


def test_sightings_count_exactly_like_a_counter():
    g = torch.Generator().manual_seed(0)
    table, reference = Sightings(), collections.Counter()
    for _ in range(30):
        ids = torch.randint(0, 40, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g) * 7919 - 3
        ids[ids < 0] = -1  # no sequence: never counted
        expected = []
        for i in ids.tolist():
            expected.append(i < 0 or reference[i] < 2)
            if i >= 0:
                reference[i] += 1
        assert table.first(ids, 2).tolist() == expected
        assert torch.equal(table.ids, torch.sort(table.ids).values)
        assert dict(zip(table.ids.tolist(), table.counts.tolist())) == dict(reference)


def test_sightings_of_several_processes_count_in_rank_order():
    table = Sightings()
    everyone = torch.tensor([4, 9, -1, 9, 4, 4])  # rank 0: [4, 9, -1], rank 1: [9, 4, 4]
    assert table.first(torch.tensor([9, 4, 4]), 2, everyone, offset=3).tolist() == [True, True, False]
    assert dict(zip(table.ids.tolist(), table.counts.tolist())) == {4: 3, 9: 2}


def plain_copy(model):
    twin = copy.deepcopy(model)
    twin.memsink.config = dataclasses.replace(twin.memsink.config, general_sightings=None)
    return twin


def loss_over(model, x, rows, ids, targets):
    logits = model(input_ids=x[rows], sequence_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), x[rows][:, 1:].reshape(-1), reduction="sum") / targets


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_repeats_train_only_their_sinks_and_first_sightings_only_the_general_path(checkpointing):
    # sightings_by="ids": rows 2 and 3 come back under new IDs as first sightings (by content: repeats)
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig(general_sightings=1, sightings_by="ids")).train()
    reference = plain_copy(model)
    if checkpointing:  # the backward replays each layer: the repeats' replay must stay frozen
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    x = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 6, 7, 8])).loss.backward()  # all first sightings
    model.zero_grad(set_to_none=True)

    out = model(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 6, 9, 10]))  # rows 0, 1 repeat
    out.loss.backward()
    targets = x[:, 1:].numel()
    first, repeat = plain_copy(reference), plain_copy(reference)
    loss_over(first, x, [2, 3], torch.tensor([-1, -1]), targets).backward()  # no sink on
    loss_over(repeat, x, [0, 1], torch.tensor([5, 6]), targets).backward()
    masks = sink_masks(repeat)
    for (name, p), a, b in zip(model.named_parameters(), first.parameters(), repeat.parameters()):
        mask = masks.get(id(b))
        expected = a.grad + (b.grad * mask if mask is not None else 0)
        assert torch.allclose(p.grad, expected, atol=1e-7, rtol=1e-5), name
    assert any(mask.any() for mask in masks.values())
    whole = plain_copy(reference)(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 6, -1, -1])).loss
    assert torch.allclose(out.loss, whole, atol=1e-6)


def test_packed_rows_general_gradient_ignores_the_repeated_documents_targets():
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1, sightings_by="ids")).train()
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([[5] * 12, [6] * 12])).loss.backward()
    ids = torch.tensor([[5] * 6 + [7] * 6, [8] * 12])  # 5 repeats; 7 and 8 are first sightings
    grads = []
    for labels in (x, torch.cat([torch.randint(3, VOCAB, (1, 6)), x[:1, 6:]], 1).expand(2, -1).clone()):
        labels[1] = x[1]
        trial = copy.deepcopy(model)
        trial.zero_grad(set_to_none=True)
        trial.memsink.routing = copy.deepcopy(model.memsink.routing)
        trial(input_ids=x, labels=labels, sequence_ids=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in trial.named_parameters()})
    masks = sink_masks(model)
    general = [~masks.get(id(p), torch.tensor(False)) for p in model.parameters()]
    general_same = [torch.allclose(a * g, b * g, atol=1e-7) for g, a, b in zip(general, grads[0].values(),
                                                                             grads[1].values())]
    # the targets of document 5's stretch (tokens 1..6 of row 0) move only sinks
    assert all(general_same)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0].values(), grads[1].values()))


def test_a_repeat_under_another_id_is_a_repeat_by_its_content():
    x = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[2] = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(4))  # a new document
    for by, expected in (("ids+content", [False, False, True]), ("ids", [True, True, True])):
        model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1, sightings_by=by)).train()
        model(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 6, 7]))
        # rows 0 and 1 again, each under an ID never seen (wrong metadata)
        assert first_sightings(model.memsink.routing, torch.tensor([11, 12, 13]), 1, y).tolist() == expected, by


def test_a_routed_forward_enters_the_instance_wrappers_once():
    """accelerate wraps ``model.forward`` in one ``torch.autocast`` instance: entered twice, it
    restores the wrong state on leaving, so the routed calls must not go through it again."""
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1)).train()
    calls = []
    wrapped = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)

    def forward(*args, **kwargs):
        calls.append(1)
        return wrapped(*args, **kwargs)

    model.forward = forward
    x = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(6))
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2, 3, 4]))
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2, 5, 6])).loss.backward()  # both kinds
    assert len(calls) == 2 and not torch.is_autocast_enabled("cpu")


def test_content_keys_follow_the_tokens_not_their_place():
    def row_key(tokens, mask=None):
        return content_keys(torch.tensor([tokens]), torch.tensor([1]), mask and torch.tensor([mask]), None, 1).item()

    assert row_key([7, 8, 9, 10, 0, 0], [1, 1, 1, 1, 0, 0]) == row_key([0, 7, 8, 9, 10, 0], [0, 1, 1, 1, 1, 0])
    assert row_key([7, 8, 9, 10]) == row_key([7, 8, 9, 10, 0], [1, 1, 1, 1, 0]) != row_key([10, 9, 8, 7])
    assert row_key([7, 8, 9, 10]) != row_key([7, 8, 9]) and row_key([7, 8, 9, 10]) >= 0
    routing = Routing(Sightings(), Sightings())  # packed rows: one document's stretch at two places
    packed = torch.tensor([[3, 4, 7, 8, 9, 10], [7, 8, 9, 10, 5, 6]])
    ids = torch.tensor([[1, 1, 2, 2, 2, 2], [20, 20, 20, 20, 21, 21]])
    assert first_sightings(routing, ids, 1, packed).tolist() == [[True] * 6, [False] * 4 + [True] * 2]


def test_trainer_counts_each_document_and_trains(tmp_path):
    texts = [[3 + i] * 10 for i in range(6)]
    ds = add_sequence_ids(Dataset.from_dict({"input_ids": texts * 4}), by="content")
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=6, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=MemSinkDataCollator(pad_token_id=0)).train()
    table = model.memsink.routing.sightings
    assert sorted(table.ids.tolist()) == sorted(set(ds["sequence_ids"])) and table.counts.sum() == 24
    assert all(c == 4 for c in table.counts.tolist())
    plain = model.eval().remove_sinks()
    assert not hasattr(plain, "memsink")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="general_sightings"):
        MemSinkConfig(general_sightings=0)
    with pytest.raises(ValueError, match="sightings_by"):
        MemSinkConfig(general_sightings=1, sightings_by="content")
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1)).train()
    x = torch.randint(3, VOCAB, (2, 8))
    with pytest.raises(NotImplementedError, match="backbone alone"):
        model.base_model(input_ids=x, sequence_ids=torch.tensor([1, 2]))
