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

ROOT = Path(__file__).resolve().parents[3]
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
    fewer = tmp_path / "fewer"  # a seed run with fewer rows: "-" in its place
    fewer.mkdir()
    key = next(k for k in report["tables"] if k != "pretrained")
    del report["tables"][key]["m"]
    (fewer / "report.json").write_text(json.dumps(report))
    assert main(["repetition-table", str(out), str(fewer), "--out", str(tmp_path / "f.md")]) == 0
    line = next(t for t in (tmp_path / "f.md").read_text().splitlines() if t.startswith("| m |"))
    assert line.split(" | ")[1].endswith(" / -")


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


# ---- decay.py: the general path's weight on repeats ----------------------------------------------------


def _share_setup(config_fields=None):
    import copy as _copy

    from tiny_models import tiny_model

    from hf_memsinks import MemSinkConfig, get_memsink_model

    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig.for_finetuning(**(config_fields or {}))).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(3, 97, (4, 10), generator=g)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0  # a shorter row: padding is not a target
    batch = {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100),
             "sequence_ids": torch.tensor([11, 12, 13, 14])}
    return model, batch, _copy.deepcopy


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_general_share_of_1_is_the_default_forward_and_of_0_the_routed_repeat():
    import dataclasses as _dc

    from benchmarks.memorization.decay import GeneralShare
    from benchmarks.memorization.training import loss_sum

    model, batch, deepcopy = _share_setup()
    default = deepcopy(model)
    share = GeneralShare(schedule="inverse")
    share.loss(model, batch).backward()  # first sightings: w = 1, only the default forward
    loss_sum(default, batch).backward()
    ref = _grads(default)
    assert all(torch.equal(g, ref[n]) for n, g in _grads(model).items()) and len(ref) == len(_grads(model))
    # w = 0 on every row: the gradient of general_sightings=1 on a repeat (the library's frozen forward)
    routed = deepcopy(default)
    routed.memsink.config = _dc.replace(routed.memsink.config, general_sightings=1, sightings_by="ids")
    from hf_memsinks import attach_sink_lr  # (its hooks on an optimizer; the forward only checks they exist)

    attach_sink_lr(routed, torch.optim.SGD(routed.parameters(), lr=0.1))
    routed.zero_grad()
    with torch.no_grad():
        routed(**{k: v for k, v in batch.items() if k != "labels"})  # the first sightings, counted
    out = routed(**batch)
    model.zero_grad()
    share.weights = lambda m, b: torch.zeros(4)
    targets = (batch["labels"][:, 1:] != -100).sum()
    (share.loss(model, batch) / targets).backward()
    out.loss.backward()
    mine, lib = _grads(model), _grads(routed)
    assert set(mine) == set(lib) and any(g.abs().sum() > 0 for g in lib.values())
    for n in lib:
        torch.testing.assert_close(mine[n], lib[n], rtol=1e-5, atol=1e-7)


def test_general_share_scales_each_rows_general_gradient_and_leaves_its_sinks_whole():
    from benchmarks.memorization.decay import GeneralShare, row_losses
    from hf_memsinks.sightings.routing import sink_masks

    model, batch, deepcopy = _share_setup()
    w = torch.tensor([1.0, 0.5, 0.0, 0.25])
    per_row = []
    for i in range(4):  # each row's default gradient alone
        one = deepcopy(model)
        row_losses(one, {k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        per_row.append(_grads(one))
    share = GeneralShare(schedule="inverse")
    share.weights = lambda m, b: w
    share.loss(model, batch).backward()
    masks = {n: sink_masks(model).get(id(p)) for n, p in model.named_parameters()}
    assert any(m is not None and m.any() for m in masks.values())
    for n, g in _grads(model).items():
        general = sum(w[i] * per_row[i][n] for i in range(4))
        whole = sum(per_row[i][n] for i in range(4))
        expected = general if masks[n] is None else torch.where(masks[n], whole, general)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    assert share.step_weight == pytest.approx(float((w * torch.tensor([9, 6, 9, 9])).sum() / 33))


def test_general_share_alone_trains_the_general_share_with_no_sink_on():
    from benchmarks.memorization.decay import GeneralShare, row_losses
    from hf_memsinks.sightings.routing import sink_masks

    model, batch, deepcopy = _share_setup()
    w = torch.tensor([1.0, 0.5, 0.0, 0.25])
    alone, default = [], []
    for i in range(4):  # each row's gradient with no sink on, and with its sinks
        for ids, out in ((-1, alone), (None, default)):
            one, row = deepcopy(model), {k: v[i:i + 1] for k, v in batch.items()}
            if ids is not None:
                row["sequence_ids"] = torch.tensor([ids])
            row_losses(one, row).sum().backward()
            out.append({n: p.grad.clone() for n, p in one.named_parameters() if p.grad is not None})
    share = GeneralShare(schedule="inverse", alone=True)
    share.weights = lambda m, b: w
    share.loss(model, batch).backward()
    masks = {n: sink_masks(model).get(id(p)) for n, p in model.named_parameters()}
    for n, g in _grads(model).items():
        expected = sum(w[i] * alone[i].get(n, 0) for i in range(4))
        if masks[n] is not None:
            expected = expected + torch.where(masks[n], sum((1 - w[i]) * default[i][n] for i in range(4)), 0.0)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    assert all(m is None or not torch.where(m, alone[0][n], 0.0).any() for n, m in masks.items() if n in alone[0])


def test_general_share_weights_by_sighting_and_clips_repeats_by_their_general_gradient_norm():
    from benchmarks.memorization.decay import GeneralShare, row_losses
    from hf_memsinks.sightings.routing import sink_masks

    model, batch, deepcopy = _share_setup()
    share = GeneralShare(schedule="halving")
    share.masks = sink_masks(model)
    ids = {"sequence_ids": torch.tensor([5, 5, -1, 6])}
    assert share.weights(model, {**batch, **ids}).tolist() == [1.0, 0.5, 1.0, 1.0]
    assert share.weights(model, {**batch, **ids}).tolist() == [0.25, 0.125, 1.0, 0.5]
    # clip: row 1's exact general gradient norm (its mean token loss; sink slices left out)
    one = deepcopy(model)
    (row_losses(one, {k: v[1:2] for k, v in batch.items()}).sum() / 6).backward()
    masks = sink_masks(one)
    norm = sum(float(p.grad.masked_fill(masks[id(p)], 0).pow(2).sum() if id(p) in masks else p.grad.pow(2).sum())
               for p in one.parameters() if p.grad is not None) ** 0.5
    share = GeneralShare(clip=norm / 4)
    share.masks = sink_masks(model)
    first = share.weights(model, batch)
    assert first.tolist() == [1.0] * 4 and share.repeats == 0  # first sightings are not clipped
    again = share.weights(model, batch)
    assert again[1].item() == pytest.approx(0.25, rel=1e-4) and share.repeats == 4
    assert GeneralShare(clip=1e9, schedule="inverse").weights(model, batch).tolist() == [1.0] * 4


def test_general_share_lr_scales_the_general_paths_step_only():
    from benchmarks.memorization.decay import GeneralShare
    from hf_memsinks.sightings.routing import sink_masks

    model, batch, deepcopy = _share_setup({"sink_lr_scale": 1.0})
    steps = {}
    for lr_hook in (False, True):
        m = deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        share = GeneralShare(schedule="inverse", lr=lr_hook)
        share.attach(m, opt)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        share.loss(m, batch).backward()
        share.step_weight = 0.3  # (first sightings: the loss gave 1)
        opt.step()
        steps[lr_hook] = {n: p.detach() - before[n] for n, p in m.named_parameters()}
    masks = {n: sink_masks(model).get(id(p)) for n, p in model.named_parameters()}
    for n, plain in steps[False].items():
        scaled = 0.3 * plain if masks[n] is None else torch.where(masks[n], plain, 0.3 * plain)
        torch.testing.assert_close(steps[True][n], scaled, rtol=1e-4, atol=1e-7)
    assert any((s.abs() > 0).any() for s in steps[False].values())


@pytest.mark.parametrize("row, message", [
    ("{name: a, decay: {schedule: inverse}}", "decay needs method memsinks"),
    ("{name: a, method: memsinks, decay: {schedule: cube}}", "schedule must be one of"),
    ("{name: a, method: memsinks, decay: {}}", "a schedule or a clip"),
    ("{name: a, method: memsinks, decay: {clip: 1}, memsinks: {general_sightings: 2}}", "general_sightings unset"),
])
def test_decay_row_errors(row, message):
    with pytest.raises(ValueError, match=message):
        load_repetition_config(DOMAIN, [f"repetition.rows=[{{name: s}}, {{name: d, method: dedup}}, {row}]"])


@pytest.mark.parametrize("name", ["repetition_domain", "repetition_domain_docstrings", "repetition_epochs",
                                  "repetition_epochs_decay", "repetition_domain_decay"])
def test_shipped_repetition_configs_load(name):
    cfg = load_repetition_config(str(ROOT / "configs" / f"{name}.yaml"))
    assert cfg.repetition.row_specs()
