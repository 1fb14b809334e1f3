"""Coverage over Transformers' causal-LM mapping: a fast subset runs the full check here; the
whole run is `make coverage`, whose table (docs/coverage.json) docs/supported_models.md must match."""

import json

import pytest
import transformers
from coverage_models import (
    COVERAGE_JSON,
    causal_lm_types,
    coverage_section,
    current_coverage_section,
    run,
    summary,
)

# Varied on purpose: Conv1D (gpt2), projections on the layer (opt), no width field (bloom), MLP
# split over two sibling modules (bert), nn.Sequential MLP (ctrl), n_inner=None (codegen),
# recent dense decoders (gemma3_text, cohere2, olmo3), experts with a width field (mixtral),
# experts + shared expert (qwen2_moe), interleaved transposed experts with biases (gpt_oss), a norm
# over the hidden neurons between the projections (bitnet).
FAST = ["gpt2", "opt", "bloom", "bert", "ctrl", "codegen", "gemma3_text", "cohere2", "olmo3",
        "mixtral", "qwen2_moe", "gpt_oss", "bitnet"]


@pytest.mark.parametrize("model_type", FAST)
def test_fast_subset_passes_the_coverage_check(model_type):
    row = run(model_type)
    assert row["status"] == "pass", row.get("reason")
    # Inactive sinks have exactly zero gradient (asserted inside the check); the share of MLP
    # weights without gradient is about sink_fraction * (1 - sink_active_prob) = 0.21.
    assert 0.1 < row["expected_no_grad_share"] < 0.35
    # More can be without gradient: ReLU neurons dead on every token (ctrl, opt), routed experts
    # the batch never reaches; but the general neurons do learn.
    assert row["expected_no_grad_share"] <= row["no_grad_share"] < 0.5


def test_fast_subset_agrees_with_the_coverage_table():
    rows = {r["model_type"]: r for r in json.loads(COVERAGE_JSON.read_text())["rows"]}
    assert all(rows[t]["status"] == "pass" for t in FAST)


def test_coverage_table_is_complete_current_and_meets_the_bar():
    table = json.loads(COVERAGE_JSON.read_text())
    assert table["transformers"] == transformers.__version__, "re-run `make coverage` for this Transformers"
    assert [r["model_type"] for r in table["rows"]] == causal_lm_types()
    n = summary(table)
    assert n["passed"] >= 0.9 * n["built"], n
    for row in table["rows"]:
        if row["status"] != "pass":
            assert row["reason"], row["model_type"]


def test_supported_models_page_is_generated_from_the_table():
    table = json.loads(COVERAGE_JSON.read_text())
    assert current_coverage_section() == coverage_section(table), "run `python tests/coverage_models.py --render-only`"
