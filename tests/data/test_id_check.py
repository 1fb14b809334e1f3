"""check_ids / hf-memsinks check-ids: the share of repeated rows with a wrong ID, counted exactly
against rows we mislabelled, and the by= it recommends."""

import json
import random

import pytest
from datasets import Dataset

from hf_memsinks.cli import main
from hf_memsinks.data.id_check import check_ids

WORDS = [f"w{i}" for i in range(300)]


def corpus(repeats: int = 10, copies: int = 20, once: int = 100, seed: int = 0):
    """Rows of ``repeats`` documents each ``copies`` times and ``once`` documents seen once, shuffled,
    with each row's true document number."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(repeats + once)]
    rows = [(d, n) for n in range(repeats) for d in [docs[n]] * copies] + [(docs[n], n) for n in range(repeats,
                                                                                                      len(docs))]
    rng.shuffle(rows)
    return [t for t, _ in rows], [n for _, n in rows]


def test_exact_ids_are_kept_and_wrong_ones_counted_exactly():
    texts, truth = corpus()
    check = check_ids(Dataset.from_dict({"text": texts, "doc": [f"user-{n}" for n in truth]}), "doc")
    assert (check.rows, check.repeated_groups, check.repeated_rows, check.distinct_ids) == (300, 10, 200, 110)
    assert check.exact_repeats and check.split_groups == 0 and check.disagreeing_rows == 0
    assert check.recommended_by == "metadata"
    rng = random.Random(1)
    wrong = rng.sample([i for i, n in enumerate(truth) if n < 10], 20)  # 10% of the repeated rows
    ids = [f"user-{(n + 1 + rng.randrange(100)) if i in wrong else n}" for i, n in enumerate(truth)]
    check = check_ids(Dataset.from_dict({"text": texts, "doc": ids}), "doc")
    assert check.disagreeing_rows == 20 and check.disagreement == pytest.approx(0.1)
    assert check.split_groups == len({truth[i] for i in wrong})
    assert check.recommended_by == "content" and "10.0%" in check.reason


def test_missing_coarse_and_no_ids():
    texts, truth = corpus()
    ids = [-1 if n == 3 else n // 4 for n in truth]  # document 3 unlabelled; four documents per ID
    check = check_ids(Dataset.from_dict({"text": texts, "sequence_ids": ids}))
    assert check.rows_without_id == 20 and check.disagreeing_rows == 20 and check.split_groups == 1
    assert check.shared_ids == 28 and check.distinct_ids == 28  # 110 documents in fours, each ID on 2-4 of them
    coarse = check_ids(Dataset.from_dict({"text": texts, "sequence_ids": [n // 4 for n in truth]}))
    assert coarse.recommended_by == "metadata" and "sightings_by='content'" in coarse.reason
    exact = check_ids(Dataset.from_dict({"text": texts, "sequence_ids": truth}))
    assert exact.shared_ids == 0 and "sightings_by" not in exact.reason
    plain = check_ids(Dataset.from_dict({"text": texts}))
    assert plain.recommended_by == "content" and plain.distinct_ids == 0 and "no IDs" in plain.reason


def test_edited_copies_recommend_near_duplicates(tmp_path, capsys):
    texts, truth = corpus()
    rng = random.Random(2)
    edited = []
    for text, n in zip(texts, truth):
        words = text.split()
        if n < 10:
            words[rng.randrange(30)] = rng.choice(WORDS)
        edited.append(" ".join(words))
    check = check_ids(Dataset.from_dict({"text": edited}), ids_column=None)
    assert not check.exact_repeats and check.repeated_groups == 10 and check.recommended_by == "near_duplicates"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t, "sequence_ids": n}) + "\n" for t, n in zip(edited, truth)))
    assert main(["check-ids", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["disagreement"] == 0 and out["recommended_by"] == "metadata" and out["repeated_rows"] == 200
    assert main(["check-ids", str(tmp_path / "nope.jsonl")]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err
    assert main(["check-ids", str(path), "--text-column", "body"]) == 2
