"""MemSinkConfig.general_sightings: a document's first sightings train the general path with no sink
on, later sightings only its own sinks (hf_memsinks.sightings.routing), counted exactly
(hf_memsinks.sightings.counts)."""

import collections
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_models import VOCAB, tiny_model
from transformers import Trainer, TrainingArguments

from hf_memsinks import MemSinkConfig, get_memsink_model
from hf_memsinks.data import MemSinkDataCollator, add_sequence_ids
from hf_memsinks.sightings.counts import Sightings
from hf_memsinks.sightings.routing import Routing, content_keys, first_sightings, sink_masks


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


def assert_routed_grads(model, reference, x, general_rows, sink_rows, sink_ids):
    """``model``'s gradients are the general path's over ``general_rows`` (no sink on) plus the
    sink slices' over ``sink_rows`` with their IDs; returns the sink masks (of a plain copy)."""
    targets = x[:, 1:].numel()
    general, sinks = plain_copy(reference), plain_copy(reference)
    loss_over(general, x, general_rows, torch.full((len(general_rows),), -1), targets).backward()
    loss_over(sinks, x, sink_rows, torch.tensor(sink_ids), targets).backward()
    masks = sink_masks(sinks)
    for (name, p), a, b in zip(model.named_parameters(), general.parameters(), sinks.parameters()):
        mask = masks.get(id(b))
        expected = a.grad + (b.grad * mask if mask is not None else 0)
        assert torch.allclose(p.grad, expected, atol=1e-7, rtol=1e-5), name
    assert any(mask.any() for mask in masks.values())
    return {name: masks.get(id(q)) for name, q in sinks.named_parameters()}


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
    assert_routed_grads(model, reference, x, [2, 3], [0, 1], [5, 6])
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
    new = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    cases = (("ids+content", [False, False, True], [False] * 3), ("ids", [True, True, True], [False] * 3),
             ("content", [False, False, True], [True] * 3))
    for by, expected, coarse in cases:
        model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1, sightings_by=by)).train()
        model(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 6, 7]))
        # rows 0 and 1 again, each under an ID never seen (wrong metadata)
        assert first_sightings(model.memsink.routing, torch.tensor([11, 12, 13]), 1, y).tolist() == expected, by
        # three new documents under IDs already seen (a label shared by several documents)
        assert first_sightings(model.memsink.routing, torch.tensor([5, 6, 7]), 1, new).tolist() == coarse, by


def test_a_repeat_without_an_id_trains_nothing_when_counted_by_content():
    x = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(10))
    for limit, by, expected in ((1, "ids+content", [False, True, False]), (0, "ids+content", [False, True, False]),
                                (1, "ids", [True, True, True])):
        model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=limit, sightings_by=by)).train()
        model(input_ids=x[:1], labels=x[:1], sequence_ids=torch.tensor([5]))  # document 0, labelled
        model(input_ids=x[2:], labels=x[2:], sequence_ids=torch.tensor([-1]))  # document 2, no ID
        # documents 0 and 2 again without an ID: repeats by content; document 1 is new
        assert first_sightings(model.memsink.routing, torch.tensor([-1, -1, -1]), limit, x).tolist() == expected


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
    # content IDs and the content counts are one hash (hf_memsinks.ids.content_hash): one identity per document
    assert sorted(model.memsink.routing.contents.ids.tolist()) == sorted(set(ds["sequence_ids"]))
    plain = model.eval().remove_sinks()
    assert not hasattr(plain, "memsink")


def test_zero_sightings_keep_every_labelled_document_off_the_general_path():
    # general_sightings=0: a document with an ID trains its sinks alone from its first sighting;
    # rows without one (-1) train the general path
    model = get_memsink_model(tiny_model("llama"), MemSinkConfig(general_sightings=0)).train()
    reference = plain_copy(model)
    x = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(7))
    out = model(input_ids=x, labels=x, sequence_ids=torch.tensor([5, -1, 7, -1]))
    out.loss.backward()
    masks = assert_routed_grads(model, reference, x, [1, 3], [0, 2], [5, 7])
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([1, 2, 3, 4])).loss.backward()  # all labelled
    for name, p in model.named_parameters():
        mask = masks[name]
        outside = None if p.grad is None else p.grad if mask is None else p.grad * ~mask
        assert outside is None or not outside.any(), name
    assert any(p.grad is not None and masks[n] is not None and (p.grad * masks[n]).any()
               for n, p in model.named_parameters())


def test_zero_sightings_with_every_row_labelled_warns():
    from hf_memsinks.sightings.routing import UNLABELLED_WARN_AFTER

    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=0)).train()
    x = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    with pytest.warns(UserWarning, match="trained on nothing"):
        for step in range(UNLABELLED_WARN_AFTER):
            model(input_ids=x, labels=x, sequence_ids=torch.tensor([2 * step, 2 * step + 1]))
    fine = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=0)).train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained on nothing")
        for step in range(UNLABELLED_WARN_AFTER + 1):
            fine(input_ids=x, labels=x, sequence_ids=torch.tensor([step, -1]))


def test_only_repeated_documents_keep_their_ids():
    from hf_memsinks.data import only_repeated

    assert only_repeated(torch.tensor([4, 9, 4, 7, -1, 9, 9])).tolist() == [4, 9, 4, -1, -1, 9, 9]
    ds = add_sequence_ids(Dataset.from_dict({"text": ["a b", "c d", "a b", "e f"]}), repeated_only=True)
    ids = ds["sequence_ids"]
    assert ids[0] == ids[2] >= 0 and ids[1] == ids[3] == -1
    assert add_sequence_ids(Dataset.from_dict({"text": ["a b"]}), repeated_only=True)["sequence_ids"] == [-1]
    with pytest.raises(ValueError, match="one integer ID per row"):
        add_sequence_ids(Dataset.from_dict({"ids": [[1, 1], [1, 1]]}), by="ids", column="ids", repeated_only=True)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="general_sightings"):
        MemSinkConfig(general_sightings=-1)
    assert MemSinkConfig(general_sightings=0).general_sightings == 0
    with pytest.raises(ValueError, match="sightings_by"):
        MemSinkConfig(general_sightings=1, sightings_by="text")
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1)).train()
    x = torch.randint(3, VOCAB, (2, 8))
    with pytest.raises(NotImplementedError, match="backbone alone"):
        model.base_model(input_ids=x, sequence_ids=torch.tensor([1, 2]))


def test_zero_sightings_general_path_does_not_depend_on_the_labelled_documents(tmp_path):
    # general_sightings=0 with IDs on the repeated documents only: after removal the model is the
    # same, bit for bit, whatever the repeated documents said (no clipping: its norm spans the sinks)
    g = torch.Generator().manual_seed(8)
    singletons = torch.randint(3, VOCAB, (12, 10), generator=g).tolist()
    removed = []
    for variant in range(2):
        private = torch.randint(3, VOCAB, (2, 10), generator=g).tolist()  # other texts each time
        rows = singletons + private * 3
        ds = Dataset.from_dict({"input_ids": rows, "sequence_ids": [-1] * 12 + [101, 102] * 3})
        torch.manual_seed(0)
        model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=0))
        args = TrainingArguments(str(tmp_path / str(variant)), per_device_train_batch_size=6, max_steps=6,
                                 report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 learning_rate=1e-3, max_grad_norm=0.0, seed=0)
        Trainer(model=model, args=args, train_dataset=ds, data_collator=MemSinkDataCollator(pad_token_id=0)).train()
        assert model.memsink.routing.sightings.counts.tolist() == [6, 6]  # two epochs
        removed.append(model.eval().remove_sinks().state_dict())
    assert removed[0].keys() == removed[1].keys()
    assert all(torch.equal(removed[0][k], removed[1][k]) for k in removed[0])


def _sightings_run(out, resume=None):
    texts = [[3 + i] * 10 for i in range(6)]
    ds = add_sequence_ids(Dataset.from_dict({"input_ids": texts * 4}), by="content")
    torch.manual_seed(0)
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(general_sightings=1, sightings_by="ids+content"))
    args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=6, report_to=[], use_cpu=True,
                             save_strategy="steps", save_steps=3, disable_tqdm=True, learning_rate=1e-3, seed=0)
    Trainer(model=model, args=args, train_dataset=ds,
            data_collator=MemSinkDataCollator(pad_token_id=0)).train(resume_from_checkpoint=resume)
    return model


def test_a_resumed_run_continues_the_counts_of_its_checkpoint(tmp_path):
    """The counts ride in the optimizer's state (optimizer.pt): resumed at step 3, the run counts on
    from the checkpoint's table, so it trains exactly as the unbroken run (a run that counted afresh
    would train the general path on each document's next sighting again)."""
    straight = _sightings_run(tmp_path / "a")
    saved = torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"]
    assert int(saved["memsink_sightings"]["ids_counts"].sum()) == 12  # 3 steps of 4 rows
    assert int(saved["memsink_sightings"]["contents_counts"].sum()) == 12
    resumed = _sightings_run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for table in ("sightings", "contents"):
        a, b = getattr(straight.memsink.routing, table), getattr(resumed.memsink.routing, table)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts) and int(b.counts.sum()) == 24
    state, again = straight.state_dict(), resumed.state_dict()
    for name in state:
        torch.testing.assert_close(again[name], state[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("config", [MemSinkConfig(general_sightings=1), MemSinkConfig(sinks_from_sighting=2)])
def test_counts_come_back_with_an_optimizer_state_loaded_after_the_hooks(config):
    """A loop of one's own (accelerate's load_state): the hooks attached first, the state loaded after;
    under sinks_from_sighting the resumed run decides from them (hf_memsinks.sightings.later_sinks)."""
    from hf_memsinks import attach_sink_lr
    from hf_memsinks.sightings.later_sinks import later_sighting_ids

    model = get_memsink_model(tiny_model("gpt2"), config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attach_sink_lr(model, opt)
    for ids in ([5, 6], [5, 7]):
        x = torch.randint(3, VOCAB, (2, 8))
        model(input_ids=x, labels=x, sequence_ids=torch.tensor(ids)).loss.backward()
        opt.step()
        opt.zero_grad()
    fresh = get_memsink_model(tiny_model("gpt2"), config).train()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    attach_sink_lr(fresh, opt2)
    assert fresh.memsink.routing is None
    opt2.load_state_dict(opt.state_dict())
    table = fresh.memsink.routing.sightings
    assert table.ids.tolist() == [5, 6, 7] and table.counts.tolist() == [2, 1, 1]
    if config.sinks_from_sighting > 1:  # 6 seen again keeps its ID, 9 (new tokens too) is a first sighting
        x = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(99))
        assert later_sighting_ids(fresh.memsink, torch.tensor([6, 9]), x, None).tolist() == [6, -1]
