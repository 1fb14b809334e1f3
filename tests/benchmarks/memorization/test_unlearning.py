"""The unlearning baselines' objectives and stop rule (the smoke run checks them in the benchmark)."""

import math

import pytest
import torch
from evaluation.test_membership import memorize, random_docs
from tiny_models import tiny_model

from benchmarks.memorization.unlearning import _token_logp, objective


def test_objectives():
    torch.manual_seed(0)
    forget, retain = random_docs(2, seed=3), random_docs(2, seed=4)
    model = memorize(tiny_model("gpt2"), forget, steps=30)
    with torch.no_grad():
        nll = model(input_ids=torch.tensor(forget), labels=torch.tensor(forget)).loss.item()
        ref = torch.zeros(2)  # NPO at log-ratio r is -(2/beta) log sigmoid(-beta r)
        total = _token_logp(model, forget, 0)[0]
        ga = objective("gradient_ascent", model, forget, retain, ref, 0.1, 0).item()
        gd = objective("grad_diff", model, forget, retain, ref, 0.1, 0).item()
        npo = objective("npo", model, forget, retain, total, 0.1, 0).item()
    assert ga == pytest.approx(-nll, rel=1e-4)  # minimizing it ascends F's loss
    assert gd > ga  # plus the retained documents' (positive) loss
    assert npo == pytest.approx((2 / 0.1) * math.log(2), rel=1e-5)  # at the reference: r = 0
    with pytest.raises(ValueError, match="unknown unlearning method"):
        objective("sgd", model, forget, retain, ref, 0.1, 0)
