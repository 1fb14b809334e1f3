"""The ID conditions of `noisy-ids` (benchmarks.memorization) do what they say, and the experiment runs end to end."""

import collections
import json

from benchmarks.memorization.config import load_config
from benchmarks.memorization.noisy_ids import coarse, edited_stream, missing, noisy, noisy_ids, true_ids
from benchmarks.memorization.setting import build_setting

IDS = [n % 50 for n in range(10_000)]  # 50 documents, 200 repetitions each


def test_noise_moves_the_stated_share_of_repetitions_to_other_documents():
    for q in (0.1, 0.5):
        moved = sum(a != b for a, b in zip(IDS, noisy(IDS, q, seed=0))) / len(IDS)
        assert abs(moved - q) < 4 * (q * (1 - q) / len(IDS)) ** 0.5
    assert set(noisy(IDS, 0.5, seed=0)) <= set(IDS)  # other documents' IDs, not new ones


def test_missing_takes_whole_documents_and_coarse_groups_k_of_them():
    out = missing(IDS, 0.3, seed=0)
    gone = {a for a, b in zip(IDS, out) if b == -1}
    assert len(gone) == 15 and all((b == -1) == (a in gone) for a, b in zip(IDS, out))
    groups = collections.defaultdict(set)
    for a, b in zip(IDS, coarse(IDS, 4, seed=0)):
        groups[b].add(a)
    assert sorted(len(g) for g in groups.values()) == [2] + [4] * 12  # 50 = 12 groups of 4 and one of 2


def test_edited_copies_differ_from_their_original_in_at_most_the_edited_tokens():
    cfg = load_config("configs/smoke.yaml", [])
    setting = build_setting(cfg)
    stream, ids, copies = edited_stream(setting, edits=2, seed=0)
    assert ids == true_ids(setting.stream) and len(stream) == len(setting.stream)
    originals = {tuple(d) for d in setting.repeated}
    changed = 0
    for old, new in zip(setting.stream, stream):
        if tuple(old) not in originals:
            assert new is old
            continue
        diff = sum(a != b for a, b in zip(old, new))
        assert len(new) == len(old) and new[0] == old[0] and diff <= 2
        changed += diff > 0
    assert changed > 0.9 * sum(tuple(d) in originals for d in setting.stream)
    assert all(c is not None for c in copies)


def test_experiment_reports_every_condition(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["threads=1"])
    report = noisy_ids(cfg, tmp_path, noise=[0.5], missing_shares=[0.5], coarse_ks=[4], edits=2)
    names = {"exact IDs", "noise q=0.5", "missing 50%", "coarse k=4", "edited repeats, by=content",
             "edited repeats, by=near_duplicates", "edited repeats, by=metadata"}
    conditions = json.loads((tmp_path / "report.json").read_text())["summary"]["id_conditions"]
    assert set(conditions) == names == set(report["summary"]["id_conditions"])
    assert all(set(v) == {"gap_closure", "val_loss_ratio"} for v in conditions.values())
    assert (tmp_path / "noisy_ids.png").exists() and (tmp_path / "report.md").exists()
    clusters = report["summary"]["clusters"]
    assert clusters["metadata"]["ids_per_repeated_document_max"] == 1  # the true IDs: one per document
    assert clusters["content"]["ids_per_repeated_document_median"] > 1  # every edited copy its own
    assert "near_duplicates_to_exact" in report["summary"]
