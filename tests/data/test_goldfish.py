"""Goldfish loss: drop rate ~1/k over many tokens, drops a pure function of the text (two calls,
two processes, any offset, padding side or packing neighbour), -100 labels untouched and never
counted, collators with per-token sequence IDs, a memsink model trains through it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_memsinks.data import MemSinkDataCollator, MemSinkPackingCollator
from hf_memsinks.data.goldfish import GoldfishCollator, goldfish_drop_mask, goldfish_labels

ROOT = Path(__file__).resolve().parents[2]


def _tokens(b=64, t=512, vocab=50_000, seed=0):
    return torch.randint(1, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hash", ["table", "mix"])
@pytest.mark.parametrize("k,h", [(4, 13), (8, 5)])
def test_drop_rate_is_one_in_k(hash, k, h):
    x = _tokens()
    drop = goldfish_drop_mask(x, k, h, hash=hash)
    assert not drop[:, :h].any()  # fewer than h targets in the window: never dropped
    n = drop[:, h:].numel()
    rate, p = drop[:, h:].float().mean().item(), 1 / k
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, (rate, p)


def test_same_text_same_drops_wherever_it_sits():
    doc = _tokens(1, 40)[0]
    a = goldfish_drop_mask(doc[None], 4, 13)[0]
    assert a.any() and torch.equal(a, goldfish_drop_mask(doc[None].clone(), 4, 13)[0])
    # right padding, left padding (attention mask), and after another document in a packed row
    padded = torch.zeros(2, 50, dtype=torch.long)
    padded[0, :40], padded[1, 10:] = doc, doc
    mask = (torch.arange(50) < 40).long().expand(2, 50).clone()
    mask[1] = (torch.arange(50) >= 10).long()
    d = goldfish_drop_mask(padded, 4, 13, attention_mask=mask)
    assert torch.equal(d[0, :40], a) and torch.equal(d[1, 10:], a) and not d[0, 40:].any() and not d[1, :10].any()
    other = _tokens(1, 17, seed=5)[0]
    row = torch.cat([other, doc])[None]
    pos = torch.cat([torch.arange(17), torch.arange(40)])[None]
    assert torch.equal(goldfish_drop_mask(row, 4, 13, position_ids=pos)[0, 17:], a)
    # another seed or hash: other drops
    default = goldfish_drop_mask(_tokens(4, 200), 4, 13)
    assert not torch.equal(goldfish_drop_mask(_tokens(4, 200), 4, 13, seed=1), default)
    assert not torch.equal(goldfish_drop_mask(_tokens(4, 200), 4, 13, hash="mix"), default)


def test_same_drops_in_another_process():
    code = ("import torch, sys; from hf_memsinks.data.goldfish import goldfish_drop_mask; "
            "x = torch.randint(1, 50000, (8, 300), generator=torch.Generator().manual_seed(0)); "
            "sys.stdout.write(''.join('1' if v else '0' for v in "
            "torch.cat([goldfish_drop_mask(x, 4, 13, hash=h).flatten() for h in ('table', 'mix')]).tolist()))")
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    x = _tokens(8, 300)
    here = "".join("1" if v else "0" for v in torch.cat(
        [goldfish_drop_mask(x, 4, 13, hash=h).flatten() for h in ("table", "mix")]).tolist())
    assert outs[0] == outs[1] == here


def test_ignored_labels_stay_ignored_and_are_not_counted():
    x = _tokens(16, 256)
    labels = x.clone()
    labels[:, ::3] = -100
    out = goldfish_labels(x, labels, k=4, h=13)
    assert torch.all(out[labels == -100] == -100)
    kept = labels != -100
    assert torch.equal(out[kept & (out != -100)], labels[kept & (out != -100)])
    newly = (out == -100) & kept
    eligible = kept.clone()
    eligible[:, :13] = False
    rate = newly.sum().item() / eligible.sum().item()
    assert abs(rate - 0.25) < 0.03
    every_third = torch.zeros_like(x, dtype=torch.bool).index_fill(1, torch.arange(0, 256, 3), True)
    assert torch.equal(labels, x.masked_fill(every_third, -100))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="k must be"):
        goldfish_drop_mask(_tokens(1, 20), k=1)
    with pytest.raises(ValueError, match="unknown goldfish hash"):
        GoldfishCollator(MemSinkDataCollator(pad_token_id=0), hash="md5")


def test_collators_with_per_token_ids():
    docs = [_tokens(1, n, seed=n)[0].tolist() for n in (30, 45, 20)]
    feats = [{"input_ids": d, "sequence_ids": [7 + i] * len(d)} for i, d in enumerate(docs)]
    plain = MemSinkDataCollator(pad_token_id=0)
    batch = GoldfishCollator(plain, k=4, h=5)(feats)
    ref = plain(feats)
    assert torch.equal(batch["sequence_ids"], ref["sequence_ids"]) and torch.equal(batch["input_ids"], ref["input_ids"])
    dropped = (batch["labels"] == -100) & (ref["labels"] != -100)
    kept = batch["labels"] != -100
    assert dropped.any() and torch.all(ref["labels"][kept] == batch["labels"][kept])
    for i, d in enumerate(docs):  # each document's drops are its own, as if alone
        alone = goldfish_drop_mask(torch.tensor(d)[None], 4, 5)[0]
        assert torch.equal(dropped[i, :len(d)], alone)
    packed = GoldfishCollator(MemSinkPackingCollator(max_length=128), k=4, h=5)(feats)
    ref = MemSinkPackingCollator(max_length=128)(feats)
    assert torch.equal(packed["sequence_ids"], ref["sequence_ids"])
    assert torch.equal(packed["position_ids"], ref["position_ids"])
    dropped = (packed["labels"] == -100) & (ref["labels"] != -100)
    at = 0
    for d in docs:
        assert torch.equal(dropped[0, at:at + len(d)], goldfish_drop_mask(torch.tensor(d)[None], 4, 5)[0])
        at += len(d)


def test_memsink_model_trains_with_goldfish_labels():
    from tiny_models import VOCAB, tiny_model

    from hf_memsinks import MemSinkConfig, get_memsink_model

    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sink_fraction=0.5))
    feats = [{"input_ids": _tokens(1, 40, vocab=VOCAB, seed=i)[0].tolist(), "sequence_ids": 11 + i} for i in range(4)]
    batch = GoldfishCollator(MemSinkDataCollator(pad_token_id=0), k=2, h=3)(feats)
    assert (batch["labels"] == -100).sum() > 0
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
