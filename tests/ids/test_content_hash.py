"""One content hash (hf_memsinks/ids/content_hash.py): the sequence IDs derived from data keep
their values bit for bit, and the content counts of general_sightings give a token list the same
identity as add_sequence_ids does."""

import numpy as np
import torch

from hf_memsinks.data import sequence_ids
from hf_memsinks.data.sequence_ids import ids_for_documents, stable_id
from hf_memsinks.ids import content_hash
from hf_memsinks.sightings import routing
from hf_memsinks.sightings.counts import Sightings
from hf_memsinks.sightings.routing import Routing, content_keys, first_sightings

KEY = "k" * 16

# Values of stable_id before the hash moved to hf_memsinks.ids (saved with users' datasets): never change.
FROZEN = [
    ("hello", 8426663150312574315, 5850316795143040060),
    (b"hello", 3542150303136764423, 3731205315705331099),
    (1, 8549332158752581404, 4097540710564169843),
    (True, 8309277399952110716, 7774967719983960185),
    ([1, 2, 3], 4864069071176103360, 5888919455505554368),
    ((5,), 2502189829102777461, 2909475237452996390),
    (np.array([1, 2, 3]), 4864069071176103360, 5888919455505554368),
    (torch.tensor([7, 8]), 6744398447729508151, 5367548217788959446),
    ({"a": 1}, 1622034048665110353, 1091905773125906491),
    ("x" * 100, 6477455037994237688, 923561038383560983),
]


def test_sequence_ids_keep_their_values():
    for value, unkeyed, keyed in FROZEN:
        assert (stable_id(value), stable_id(value, KEY)) == (unkeyed, keyed), value


def test_data_ids_and_routing_use_the_one_function():
    assert sequence_ids.content_id is content_hash.content_id
    assert routing.token_content_ids is content_hash.token_content_ids
    assert not hasattr(routing, "_MIX")  # the mixing constants live in hf_memsinks.ids.masks only
    assert content_hash.token_content_id([4, 5, 6]) == stable_id([4, 5, 6])
    lists = [[4, 5, 6], [], [7], [8, 9]]
    assert content_hash.token_content_ids(np.array(sum(lists, [])), [3, 0, 1, 2]) == [stable_id(t) for t in lists]


def test_a_rows_content_key_is_the_content_id_of_its_tokens():
    rows = [[7, 8, 9, 10], [3, 4, 5, 6]]
    padded = torch.tensor([[7, 8, 9, 10, 0], [0, 3, 4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    keys = content_keys(padded, torch.tensor([1, 2]), mask, None, 2)
    assert keys.tolist() == ids_for_documents(rows).tolist()


def test_a_packed_stretch_key_is_the_content_id_of_its_document():
    packed = torch.tensor([[3, 4, 7, 8, 9, 10], [7, 8, 9, 10, 5, 6]])
    ids = torch.tensor([[1, 1, 2, 2, 2, 2], [20, 20, 20, 20, 21, 21]])
    pairs = torch.stack([torch.arange(2).unsqueeze(1).expand_as(ids)[ids >= 0], ids[ids >= 0]], 1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    keys = content_keys(packed, ids, None, inverse, unique.shape[0])
    assert keys.tolist() == [stable_id(d) for d in ([3, 4], [7, 8, 9, 10], [7, 8, 9, 10], [5, 6])]
    # so a document whose content ID is its sequence ID is one content, however it is packed
    table = Routing(Sightings(), Sightings())
    first_sightings(table, ids, 1, packed)
    assert sorted(table.contents.ids.tolist()) == sorted({stable_id(d) for d in ([3, 4], [7, 8, 9, 10], [5, 6])})
