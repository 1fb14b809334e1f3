"""Exposure of planted secrets: the estimators' arithmetic, and a model that memorized one
secret sentence (exposure at its cap, exactly and by sampling) against secrets it never saw."""

import math

import pytest
import torch
from test_membership import memorize
from tiny_models import tiny_model

from hf_memsinks.evaluation import exposure
from hf_memsinks.evaluation.exposure import candidate_secrets, exposure_from_losses


def test_estimators():
    others = torch.tensor([1.0, 2.0, 3.0])
    assert exposure_from_losses(0.5, others) == pytest.approx(2.0)  # best of 4: -log2(1/4)
    assert exposure_from_losses(9.0, others) == pytest.approx(0.0)  # worst
    assert exposure_from_losses(0.5, others, space=4) == pytest.approx(2.0)  # exact: rank 1 of 4
    assert exposure_from_losses(2.5, others, space=4) == pytest.approx(math.log2(4 / 3))  # rank 3 of 4
    assert exposure_from_losses(1.5, others, space=4) == pytest.approx(1.0)  # rank 2 of 4
    assert len(candidate_secrets("07", "0123456789", None, 0)) == 99 and "07" not in candidate_secrets(
        "07", "0123456789", None, 0)
    sampled = candidate_secrets("123", "0123456789", 50, 1)
    assert len(sampled) == 50 and "123" not in sampled and sampled == candidate_secrets("123", "0123456789", 50, 1)


@pytest.fixture(scope="module")
def secret_model():
    from benchmarks.memorization.corpus import embedded_stories, train_tokenizer

    tok = train_tokenizer(embedded_stories(200), vocab_size=300)
    text = "the secret code of Alice is 4821."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    model = memorize(tiny_model("gpt2", vocab_size=300), [ids], steps=100)
    return model, tok, text


def test_a_memorized_secret_is_exposed(secret_model):
    model, tok, text = secret_model
    exact = exposure(model, tok, text, "4821")  # 10^4 candidates: exact
    assert exact["exact"] and exact["space"] == 10_000 and exact["candidates"] == 9999
    assert exact["exposure"] == pytest.approx(math.log2(10_000)) == pytest.approx(exact["max_exposure"])
    sampled = exposure(model, tok, text, "4821", max_exact=100, candidates=300)
    assert not sampled["exact"] and sampled["max_exposure"] == pytest.approx(math.log2(301))
    assert sampled["exposure"] == pytest.approx(sampled["max_exposure"])


def test_unseen_secrets_are_not(secret_model):
    model, tok, _ = secret_model
    values = [exposure(model, tok, f"the secret code of {name} is {secret}.", secret, candidates=300,
                       max_exact=100)["exposure"] for name, secret in
              (("Bob", "7730"), ("Carol", "1902"), ("Dan", "5566"), ("Eve", "3141"), ("Fay", "8080"))]
    assert sum(values) / len(values) < 4.0, values  # 1.44 bits expected; 8.2 is the cap


def test_bad_secrets():
    with pytest.raises(ValueError, match="does not appear"):
        exposure(None, None, "no secret here", "123")
    with pytest.raises(ValueError, match="outside the alphabet"):
        exposure(None, None, "code 12a", "12a")
