"""The repetition benchmark (benchmarks/memorization/repetition.py): its two settings' streams, an end-to-end
run of each on tiny sizes, the loss gate's routing, and config errors."""

import json
import random
from pathlib import Path

import pytest
import torch

from benchmarks.memorization.cli import main
from benchmarks.memorization.gate import LossGate
from benchmarks.memorization.repetition import build_repetition, load_repetition_config

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = str(ROOT / "configs" / "repetition_domain.yaml")
EPOCHS = str(ROOT / "configs" / "repetition_epochs.yaml")
WORDS = ("the option sets file mode of each directory when given prints value default list user process "
         "command output signal reads writes returns error flag").split()
SMALL = ["data.repeated_natural=8", "data.control=8", "data.validation=8", "data.secret_canaries=2",
         "tokenizer.vocab_size=300", "eval.exposure_candidates=8", "eval.batch_size=32"]


def domain_file(path: Path, n: int = 300) -> str:
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_domain_setting_repeats_the_domain_and_dedup_sees_each_document_once(tmp_path):
    cfg = load_repetition_config(DOMAIN, SMALL + [f"repetition.domain.source={domain_file(tmp_path / 'd.jsonl')}",
                                                  "repetition.documents=20", "train.steps=30", "train.batch_size=8"])
    s = build_repetition(cfg)
    stream, dedup = [tuple(d) for d in s.stream], [tuple(d) for d in s.dedup_stream]
    assert len(stream) == len(dedup) == 30 * 8
    private = [tuple(d) for d in s.stream if stream.count(tuple(d)) > 1]
    assert len(set(private)) == 20 + 2  # the domain's documents and the secrets
    for doc in set(private):
        assert stream.count(doc) == cfg.data.repetitions and dedup.count(doc) == 1
    held_out = {tuple(d) for d in s.control_natural + s.validation}
    assert not held_out & set(stream) and not held_out & set(dedup)
    assert all(tuple(d) in set(private) for d in s.natural)  # members are repeated documents


def test_epochs_setting_is_whole_passes_and_one_epoch_is_the_first(tmp_path):
    cfg = load_repetition_config(EPOCHS, SMALL + [f"repetition.domain.source={domain_file(tmp_path / 'd.jsonl')}",
                                                  "repetition.documents=30", "repetition.epochs=[3]",
                                                  "train.batch_size=8", "repetition.pretrain.steps=10"])
    s = build_repetition(cfg)
    one, three = s.epoch_streams[1], s.epoch_streams[3]
    assert len(one) == 32 // 8 * 8 and three[:len(one)] == one
    private = {tuple(d) for d in three}
    assert len(private) == 32
    counts = [sum(tuple(d) == doc for d in three) for doc in private]
    assert max(counts) == 3 and sum(counts) == len(three)
    assert len(s.pretrain_stream) == 10 * 8 and s.old_validation


@pytest.mark.parametrize("config, overrides", [
    (DOMAIN, ["repetition.documents=20", "train.steps=30", "train.batch_size=8",
              "repetition.rows=[{name: s}, {name: d, method: dedup}, {name: m, method: memsinks, "
              "memsinks: {general_sightings: 1}}, {name: g, method: memsinks, gate: {holdout: 0.2}}]"]),
    (EPOCHS, ["repetition.documents=24", "repetition.epochs=[2]", "train.batch_size=8", "repetition.pretrain.steps=6",
              "repetition.rows=[{name: s}, {name: d, method: dedup}, {name: m, method: memsinks, recipe: true}]"]),
])
def test_repetition_end_to_end(tmp_path, config, overrides, capsys):
    source = domain_file(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(["repetition", config, *SMALL, *overrides, f"repetition.domain.source={source}",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    table = next(t for k, t in report["tables"].items() if k != "pretrained")
    assert table["s"]["gap_closure"] == 0 and table["s"]["benefit_kept"] == 1 and table["d"]["benefit_kept"] == 0
    assert "| m |" in (out / "report.md").read_text()
    assert main(["repetition-table", str(out), str(out), "--out", str(tmp_path / "t.md")]) == 0
    assert " / " in (tmp_path / "t.md").read_text()


def test_loss_gate_routes_repeats_by_the_general_paths_loss_against_held_out_documents():
    gate = LossGate(holdout=0.5)
    ids = torch.tensor([3, 10006, 5, 5010])  # 3 and 5 are held out (id % 10007 < 5003), 10006 and 5010 not
    losses = {3: 2.0, 10006: 1.0, 5: 2.0, 5010: 3.0}
    gate.general_losses = lambda model, batch: torch.tensor([losses[i] for i in ids.tolist()])
    batch = {"sequence_ids": ids, "input_ids": torch.zeros(4, 2, dtype=torch.long)}
    model = torch.nn.Linear(1, 1)
    assert gate(model, batch).tolist() == [3, -1, 5, -1]  # first sightings: the general path, held-out: sinks
    assert gate.ref == 2.0
    # repeats: 10006 fits better than unseen documents (1.0 < 2.0): sinks; 5010 still worse (3.0): general
    assert gate(model, batch).tolist() == [3, 10006, 5, -1]
    assert (gate.general, gate.sinks) == (1, 1)


@pytest.mark.parametrize("override, message", [
    ("repetition.setting=both", "setting must be one of"),
    ("repetition.rows=[{name: a}]", "exactly one row of method 'dedup'"),
    ("repetition.rows=[{name: a, method: sgd}]", "method must be one of"),
    ("repetition.rows=[{name: a, gate: {}}]", "gate needs method memsinks"),
])
def test_repetition_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_repetition_config(DOMAIN, [override])


def test_per_document_gate_compares_each_document_with_itself():
    gate = LossGate(holdout=0.5, per_document=True, margin=0.1, momentum=0.0)  # ref: the last step's
    ids = torch.tensor([3, 10006, 5010])  # 3 is held out; 10006 and 5010 are not
    losses = iter([[4.0, 6.0, 2.0],    # first sightings: the held-out documents' loss (ref) is 4.0
                   [3.5, 5.45, 1.5],   # ref fell 0.5: 10006 fell 0.55 (<= 0.5 + 0.1), 5010 fell 0.5
                   [3.5, 5.2, 1.45]])  # ref unchanged since: 10006 fell 0.8 in all (> 0.6), 5010 0.55
    gate.general_losses = lambda model, batch: torch.tensor(next(losses))
    batch = {"sequence_ids": ids, "input_ids": torch.zeros(3, 2, dtype=torch.long)}
    model = torch.nn.Linear(1, 1)
    assert gate(model, batch).tolist() == [3, -1, -1]
    assert gate(model, batch).tolist() == [3, -1, -1]  # each within the held-out documents' fall + margin
    ref = gate.ref
    assert gate(model, batch).tolist() == [3, 10006, -1] and gate.ref == ref
