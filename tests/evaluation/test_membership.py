"""Membership-inference attacks on known answers: a model trained to memorize its documents
(AUC near 1 for every attack), two halves of unseen documents (AUC within 4 null standard
deviations of 0.5), and the AUC and Min-K%++ arithmetic against brute force."""

import itertools
import math

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_memsinks.evaluation import ATTACKS, membership_auc, membership_scores, pooled_auc, privleak, roc_auc
from hf_memsinks.evaluation.membership import auc_null_std


def random_docs(n, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g).tolist()


def memorize(model, docs, steps=150, lr=3e-3):
    """Full-batch AdamW on ``docs`` until the model has them by heart."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x = torch.tensor(docs)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    members, unseen = random_docs(8, seed=1), random_docs(200, seed=2)
    torch.manual_seed(0)
    return memorize(tiny_model("gpt2"), members), members, unseen


def test_auc_against_brute_force():
    assert roc_auc(torch.tensor([3.0, 2]), torch.tensor([1.0, 0])) == 1.0
    assert roc_auc(torch.tensor([0.0]), torch.tensor([1.0, 2])) == 0.0
    assert roc_auc(torch.tensor([1.0, 1]), torch.tensor([1.0, 1])) == 0.5
    assert roc_auc(torch.tensor([2.0, 1]), torch.tensor([1.0, 0])) == 0.875
    assert math.isnan(roc_auc(torch.tensor([]), torch.tensor([1.0])))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5, (13,), generator=g).float(), torch.randint(0, 5, (17,), generator=g).float()
    brute = sum((x > y) + 0.5 * (x == y) for x, y in itertools.product(a.tolist(), b.tolist())) / (13 * 17)
    assert roc_auc(a, b) == pytest.approx(brute)


def test_pooled_auc_compares_within_groups_only():
    natural = (torch.tensor([1.0, 2]), torch.tensor([0.0, 0.5]))  # AUC 1 within
    canary = (torch.tensor([-9.0]), torch.tensor([-10.0, -8]))    # AUC 0.5 within
    assert pooled_auc([natural, canary]) == pytest.approx((1.0 * 4 + 0.5 * 2) / 6)
    assert pooled_auc([natural, (torch.tensor([]), torch.tensor([1.0]))]) == 1.0


def test_privleak():
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(1.0, 0.5) == 1.0
    assert privleak(0.25, 0.5) == -0.5
    assert math.isnan(privleak(float("nan"), 0.5))


def test_memorized_documents_are_detected_by_every_attack(trained):
    model, members, unseen = trained
    aucs = membership_auc(model, members, unseen[:8])
    assert set(aucs) == set(ATTACKS)
    for attack, auc in aucs.items():
        assert auc >= 0.95, (attack, auc)


def test_two_halves_of_unseen_documents_are_indistinguishable(trained):
    model, _, unseen = trained
    aucs = membership_auc(model, unseen[:100], unseen[100:])
    tolerance = 4 * auc_null_std(100, 100)  # 0.16: a 4-sigma band under "no leak"
    for attack, auc in aucs.items():
        assert abs(auc - 0.5) < tolerance, (attack, auc)


def test_scores_match_a_per_token_computation(trained):
    model, members, _ = trained
    doc = members[0][:20]
    scores = membership_scores(model, [doc], texts=["abc abc abc"], k=0.2)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([doc])).logits[0, :-1], -1)
    lp = logp[torch.arange(19), torch.tensor(doc[1:])]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * (logp - mu[:, None]) ** 2).sum(-1)).sqrt()
    lowest = lambda v: v.sort().values[:4].mean()  # noqa: E731  (ceil(0.2 * 19) = 4 tokens)
    import zlib

    assert scores["loss"].item() == pytest.approx(lp.mean().item(), abs=1e-5)
    assert scores["zlib"].item() == pytest.approx(lp.mean().item() / len(zlib.compress(b"abc abc abc")), abs=1e-6)
    assert scores["min_k"].item() == pytest.approx(lowest(lp).item(), abs=1e-5)
    assert scores["min_k_plus_plus"].item() == pytest.approx(lowest((lp - mu) / sigma).item(), rel=1e-3, abs=1e-3)


def test_padding_and_batching_do_not_change_scores(trained):
    model, members, unseen = trained
    docs = [members[0][:10], unseen[0], members[1][:17]]
    one = membership_scores(model, docs, batch_size=1)
    many = membership_scores(model, docs, batch_size=3)
    for attack in ATTACKS:
        assert torch.allclose(one[attack], many[attack], atol=1e-5), attack
    with pytest.raises(ValueError, match="k must be"):
        membership_scores(model, docs, k=0)
    with pytest.raises(ValueError, match="2 texts for 3"):
        membership_scores(model, docs, texts=["a", "b"])
