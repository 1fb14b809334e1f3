"""Sequence IDs for datasets (metadata, content, near-duplicates) and the two collators."""

import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from tiny_models import VOCAB, tiny_model

from hf_memsinks import NO_SEQUENCE, MemSinkConfig, get_memsink_model, sink_mask
from hf_memsinks.data import MemSinkDataCollator, MemSinkPackingCollator, add_sequence_ids, ids_for_documents, stable_id
from hf_memsinks.layers.neurons import neuron_dim
from hf_memsinks.layers.projections import is_patched_projection

TEXTS = [
    "the cat sat on the mat and looked at the bird outside the window",
    "a dog ran across the park chasing a red ball under the bright sun",
    "the cat sat on the mat and looked at the bird outside the window",
    "tom found a small key in the garden and opened the old wooden box",
]


def test_content_ids_match_exact_repeats_only():
    ds = add_sequence_ids(Dataset.from_dict({"text": TEXTS}), by="content", batch_size=2)
    ids = ds["sequence_ids"]
    assert ids[0] == ids[2] and len({ids[0], ids[1], ids[3]}) == 3
    assert all(0 <= i < 2**63 for i in ids)


def test_ids_are_stable_across_processes():
    code = "from hf_memsinks.data import stable_id; print(stable_id('hello'), stable_id([1, 2, 3]), stable_id(7))"
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout.split() for seed in (1, 2)]
    assert out[0] == out[1] == [str(stable_id("hello")), str(stable_id([1, 2, 3])), str(stable_id(7))]
    assert stable_id(1) != stable_id("1")


def test_unkeyed_ids_are_unchanged_and_keyed_ids_need_the_key():
    """Keyed IDs (blake2b keyed mode) cannot be tested against a guessed text without the key;
    the unkeyed ones stay bit-identical to the released ones."""
    assert (stable_id("hello"), stable_id([1, 2, 3]), stable_id(7)) == (
        8426663150312574315, 4864069071176103360, 7449465813426908033)
    key, other = "k" * 32, b"another-secret-key-of-32-bytes!!"
    keyed = stable_id("hello", key=key)
    assert keyed == stable_id("hello", key=key.encode()) != stable_id("hello") != stable_id("hello", key=other)
    assert 0 <= keyed < 2**63
    for bad in ("short", b"x" * 65, 123):
        with pytest.raises(ValueError, match="16 to 64 bytes"):
            stable_id("hello", key=bad)
    ds = Dataset.from_dict({"text": TEXTS, "url": ["a.com", "b.com", "a.com", "c.com"]})
    for by, column in (("content", "text"), ("metadata", "url")):
        ids = add_sequence_ids(ds, by=by, column=column, key=key)["sequence_ids"]
        assert ids == [stable_id(v, key=key) for v in ds[column]] != add_sequence_ids(ds, by=by, column=column)[
            "sequence_ids"]
    assert ids_for_documents(TEXTS, key=key).tolist() == [stable_id(t, key=key) for t in TEXTS]
    with pytest.raises(ValueError, match="derived IDs only"):
        add_sequence_ids(ds.add_column("doc", [1, 2, 3, 4]), by="ids", column="doc", key=key)


def test_metadata_ids_group_rows_and_reject_nulls():
    ds = Dataset.from_dict({"text": TEXTS, "url": ["a.com", "b.com", "a.com", "c.com"]})
    ids = add_sequence_ids(ds, by="metadata", column="url")["sequence_ids"]
    assert ids[0] == ids[2] != ids[1]
    with pytest.raises(ValueError, match="null in row 1"):
        add_sequence_ids(Dataset.from_dict({"text": TEXTS, "url": ["a", None, "b", "c"]}), by="metadata", column="url")
    with pytest.raises(ValueError, match="needs column"):
        add_sequence_ids(ds, by="metadata")
    with pytest.raises(ValueError, match="no column 'nope'"):
        add_sequence_ids(ds, by="content", column="nope")
    with pytest.raises(ValueError, match="already has"):
        add_sequence_ids(add_sequence_ids(ds), by="content")


def test_token_column_ids():
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6, 8], [5, 6, 7]]})
    ids = add_sequence_ids(ds)["sequence_ids"]
    assert ids[0] == ids[2] != ids[1]


def test_near_duplicate_ids_cluster_light_edits():
    base = ("once upon a time a little girl named lily lived in a small house near the big forest with her "
            "mother and her old grey cat who liked to sleep in the warm sun every afternoon")
    edited = base.replace("little", "small")  # one word changed
    other = ("the brave knight rode his horse to the castle on the hill where the king was waiting for news "
             "about the dragon that had burned the village by the river last winter")
    ds = Dataset.from_dict({"text": [base, other, edited, base]})
    ids = add_sequence_ids(ds, by="near_duplicates", threshold=0.6)["sequence_ids"]
    assert ids[0] == ids[2] == ids[3] == stable_id(base)
    assert ids[1] == stable_id(other)
    key = "k" * 16
    keyed = add_sequence_ids(ds, by="near_duplicates", threshold=0.6, key=key)["sequence_ids"]
    assert keyed == [stable_id(t, key=key) for t in (base, other, base, base)]
    exact = add_sequence_ids(ds, by="content")["sequence_ids"]
    assert exact[0] != exact[2]  # content hashing alone does not see the edit


def test_padding_collator_per_example_and_per_token():
    collate = MemSinkDataCollator(pad_token_id=0)
    out = collate([{"input_ids": [5, 6, 7], "sequence_ids": 11}, {"input_ids": [8, 9], "sequence_ids": 12}])
    assert out["sequence_ids"].tolist() == [11, 12]
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    out = collate([{"input_ids": [5, 6, 7], "sequence_ids": [1, 1, 2]}, {"input_ids": [8], "sequence_ids": [3]}])
    assert out["sequence_ids"].tolist() == [[1, 1, 2], [3, NO_SEQUENCE, NO_SEQUENCE]]


def test_collators_reject_bad_ids():
    collate = MemSinkDataCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="2 per-token sequence IDs for 3 tokens"):
        collate([{"input_ids": [5, 6, 7], "sequence_ids": [1, 1]}])
    with pytest.raises(KeyError, match="add_sequence_ids"):
        collate([{"input_ids": [5, 6, 7]}])
    with pytest.raises(ValueError, match="null"):
        collate([{"input_ids": [5, 6, 7], "sequence_ids": None}])
    with pytest.raises(ValueError, match="4 per-token sequence IDs for 3 tokens"):
        MemSinkPackingCollator(max_length=8)([{"input_ids": [5, 6, 7], "sequence_ids": [1, 1, 1, 1]}])


def test_packing_collator_layout():
    out = MemSinkPackingCollator(max_length=6)([
        {"input_ids": [5, 6, 7], "sequence_ids": 1},
        {"input_ids": [8, 9], "sequence_ids": 2},
        {"input_ids": [10, 11, 12, 13, 14, 15, 16], "sequence_ids": 3},
    ])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 14, 15], [16, 0, 0, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]]
    assert out["sequence_ids"].tolist() == [[1, 1, 1, 2, 2, -1], [3] * 6, [3, -1, -1, -1, -1, -1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9, -100], [-100, 11, 12, 13, 14, 15], [-100] * 6]
    assert "attention_mask" not in out


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_row_gives_each_document_its_own_sinks(model_type):
    """A packed row's logits equal each document run alone with its own ID (attention and sinks
    both stay inside the document), and one SGD step moves exactly the union of their sinks."""
    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
    model = get_memsink_model(tiny_model(model_type), cfg)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 5)]
    ids = [101, 202]
    packed = MemSinkPackingCollator(max_length=12)(
        [{"input_ids": d, "sequence_ids": i} for d, i in zip(docs, ids)])
    model.train()  # training mode: the IDs' sinks are on
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                   sequence_ids=packed["sequence_ids"]).logits
    at = 0
    for doc, i in zip(docs, ids):
        alone = model(input_ids=torch.tensor([doc]), sequence_ids=torch.tensor([i])).logits
        torch.testing.assert_close(logits[0, at:at + len(doc)], alone[0], atol=1e-5, rtol=1e-5)
        at += len(doc)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**packed).loss.backward()
    opt.step()
    expected = sink_mask(torch.tensor(ids), model.memsink_config.num_sinks_for(64)[1], 0.3).any(0)
    checked = 0
    for name, module in model.named_modules():
        if is_patched_projection(module):
            dim = neuron_dim(module, module.memsink.role)
            delta = (module.weight - before[f"{name}.weight"]).narrow(dim, module.memsink.general, module.memsink.sinks)
            moved = delta.abs().amax(dim=1 - dim) > 0
            assert torch.equal(moved, expected), name
            checked += 1
    assert checked >= 4


def test_near_duplicate_defaults_keep_copies_with_three_edits_together():
    """The defaults cluster copies of a document that each differ from it in three words (at
    other places), and keep an unrelated document apart; 5-word shingles at 0.8 do not."""
    import random

    words = ("once upon a time a little girl named lily lived in a small house near the big forest with her "
             "mother and her old grey cat who liked to sleep in the warm sun every afternoon while the birds "
             "sang in the tall trees and the wind moved the leaves of the garden by the old stone wall").split()
    rng = random.Random(0)
    copies = []
    for _ in range(20):
        w = list(words)
        for place in rng.sample(range(len(w)), 3):
            w[place] = rng.choice(["red", "blue", "dog", "ran", "sky", "cold"])
        copies.append(" ".join(w))
    other = ("the brave knight rode his horse to the castle on the hill where the king was waiting for news "
             "about the dragon that had burned the village by the river last winter")
    ds = Dataset.from_dict({"text": copies + [other]})
    ids = add_sequence_ids(ds, by="near_duplicates")["sequence_ids"]
    assert len(set(ids[:-1])) == 1 and ids[-1] != ids[0]
    strict = add_sequence_ids(ds, by="near_duplicates", threshold=0.8, shingle_size=5)["sequence_ids"]
    assert len(set(strict[:-1])) > 10


def test_add_sequence_ids_refuses_what_it_cannot_hash_and_keeps_empty_datasets_typed():
    for values in ([1.5, 2.5], [{"a": 1}, {"a": 2}], [[1.5], [2.0]]):
        with pytest.raises(TypeError, match="texts or token lists.*column 'x'"):
            add_sequence_ids(Dataset.from_dict({"x": values}), by="near_duplicates", column="x")
    for by, column in (("content", "text"), ("near_duplicates", "text"), ("metadata", "text")):
        empty = add_sequence_ids(Dataset.from_dict({"text": []}), by=by, column=column)
        assert empty.column_names == ["text", "sequence_ids"] and len(empty) == 0
        assert str(empty.features["sequence_ids"].dtype) == "int64"
