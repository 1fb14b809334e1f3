"""The memorization benchmark: smoke config end to end (report structure, finite metrics in
range, plots), any local corpus, the sweep, config errors, the post-hoc baseline's mechanics."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from benchmarks.memorization.cli import main
from benchmarks.memorization.config import load_config
from benchmarks.memorization.corpus import embedded_stories, load_documents
from benchmarks.memorization.posthoc import zero_top_neurons

ROOT = Path(__file__).resolve().parents[3]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
SECRETS = ["data.secret_canaries=4", "data.secret_digits=6", "eval.exposure_candidates=63"]
RUN_KEYS = ("val_loss", "repeated_loss", "control_loss", "memorization_gap", "extraction_rate",
            "repeated_loss_natural", "control_loss_natural", "repeated_loss_canary", "control_loss_canary")


def check_privacy(run: dict, secrets: bool) -> None:
    """Every attack's AUC per kind in [0, 1]; with secret canaries, their exposure within its cap."""
    kinds = {"natural", "canary", "all"} | ({"secret"} if secrets else set())
    assert set(run["mia_auc"]) == set(ATTACKS)
    for attack, aucs in run["mia_auc"].items():
        assert set(aucs) == kinds and all(0 <= v <= 1 for v in aucs.values()), (attack, aucs)
    if not secrets:
        assert "exposure" not in run
        return
    e = run["exposure"]
    assert e["candidates"] == 63 and e["max_exposure"] == pytest.approx(6.0) and not e["exact"]
    for part in ("trained", "control"):
        assert len(e[part]["values"]) == 4 and all(0 <= v <= 6.0 + 1e-9 for v in e[part]["values"])


def check_report(out: Path, secrets: bool = False) -> dict:
    report = json.loads((out / "report.json").read_text())
    for name in ("standard", "memsinks_removed", "memsinks_own_sinks", "dedup", "goldfish", "memsinks_goldfish_removed",
                 "memsinks_goldfish_own_sinks", "forget_memsinks_removed", "forget_memsinks_own_sinks"):
        run = report["metrics"][name]
        for key in RUN_KEYS:
            assert math.isfinite(run[key]), (name, key)
        for key in ("val_loss", "repeated_loss", "control_loss"):
            assert 0 < run[key] < 20, (name, key, run[key])
        assert 0 <= run["extraction_rate"] <= 1
        assert run["memorization_gap"] == pytest.approx(run["control_loss"] - run["repeated_loss"])
        check_privacy(run, secrets)
    summary = report["summary"]
    for key in ("gap_closure", "val_loss_ratio", "dedup_gap_closure", "posthoc_gap_closure_at_same_val_loss",
                "own_sinks_repeated_loss", "goldfish_gap_closure", "goldfish_val_loss_ratio",
                "goldfish_extraction_rate", "memsinks_goldfish_gap_closure", "memsinks_goldfish_val_loss_ratio",
                "memsinks_goldfish_extraction_rate", "forget_regime_gap_closure", "standard_mia_auc",
                "memsinks_mia_auc", "goldfish_mia_auc", "dedup_mia_auc") + (
                    ("standard_secret_exposure", "memsinks_secret_exposure") if secrets else ()):
        assert math.isfinite(summary[key]), key
    for key in ("goldfish_extraction_rate", "memsinks_goldfish_extraction_rate"):
        assert 0 <= summary[key] <= 1
    assert 0.5 < summary["val_loss_ratio"] < 2
    assert len(report["posthoc_sweep"]) == 2
    assert set(report["curves"]) == {"standard", "memsinks", "dedup", "goldfish", "memsinks+goldfish",
                                     "memsinks (forget regime)", "retrained without F"}
    check_forgetting(report["forgetting"])
    assert [p["step"] for p in report["curves"]["standard"]] == [0, 6, 12]
    assert report["versions"]["torch"] == torch.__version__ and report["timings_s"]["total"] > 0
    for png in ("curves.png", "tradeoff.png", "forgetting.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    assert "| gap_closure |" in text and "## Forgetting chosen documents" in text and "| goldfish_gap_closure |" in text
    assert "## Membership inference and exposure" in text and "| npo |" in text
    assert ("exposure, trained secrets" in text) == secrets
    return report


def check_forgetting(f: dict) -> None:
    sizes = f["sizes"]
    assert sizes == [1, 4] and f["keep"] == 4 and len(f["regimes"]) == 2
    rows = f["rows"]
    for r in rows:
        for key in ("loss_F", "loss_K", "val_loss"):
            assert math.isfinite(r[key]) and 0 < r[key] < 20, (r, key)
        for key in ("extraction_F", "extraction_K"):
            assert math.isnan(r[key]) or 0 <= r[key] <= 1, (r, key)
        if "coverage" in r:
            assert 0 <= r["coverage"] <= 1
    for regime in f["regimes"]:
        for n in sizes:
            cells = {(r["deleted"], r["served"]) for r in rows if r.get("regime") == regime and r["n"] == n}
            assert cells == {("every sink", "drop"), ("nothing", "activate"), ("nothing", "expected"),
                             ("F", "activate"),
                             ("F", "expected"), ("random", "activate"), ("random", "expected")}
    methods = {r["method"] for r in rows}
    assert {"standard", "standard retrained without F", "post-hoc zeroing aimed at F", "gradient_ascent", "grad_diff",
            "npo"} <= methods
    for r in rows:
        assert set(r["mia_auc_F"]) == set(ATTACKS) and all(0 <= v <= 1 for v in r["mia_auc_F"].values()), r
        assert set(r["privleak"]) == set(ATTACKS), r  # every n has a retrained row here
    for method in ("gradient_ascent", "grad_diff", "npo"):
        for n in sizes:
            row = next(r for r in rows if r["method"] == method and r["n"] == n)
            assert 0 <= row["steps"] <= 100 and row["stopped"] in ("K budget", "val budget", "max_steps")
            assert row["K_loss_rise"] <= 0.1 and row["val_loss_rise"] <= 0.02  # the stated budget holds
            assert f"{method} n={n}" in f["unlearning"]
    assert set(f["summary"]) == {f"{regime} n={n}" for regime in f["regimes"] for n in sizes}
    for s in f["summary"].values():
        assert all(math.isfinite(v) for k, v in s.items() if "extraction" not in k)


def test_smoke_run_end_to_end(tmp_path, capsys):
    """With secret canaries (4, 6 digits): configs/smoke.yaml itself has none, so its stream and
    numbers are those it had before they existed (test_secret_canaries_leave_other_streams_alone)."""
    assert main(["run", SMOKE, *SECRETS, "--out", str(tmp_path)]) == 0
    report = check_report(tmp_path, secrets=True)
    assert report["setting"]["secret_canaries"] == 4
    assert report["setting"]["train_documents"] == 12 * 8
    # same token budget for dedup, and its repeats really are seen once
    assert report["setting"]["dedup_train_tokens"] > 0
    out = capsys.readouterr().out  # the headline table, then where the report and plots are
    assert out.startswith("| method | gap closed (natural / canary) |") and "| memsinks, sinks removed |" in out
    assert f"every table in {tmp_path / 'report.md'}" in out


def test_secret_canaries_leave_other_streams_alone():
    """No secret canaries: the smoke stream is the one it was before they existed (pinned hash);
    with them, every other repeated and control document is unchanged and each secret repeats R times."""
    import hashlib

    from benchmarks.memorization.setting import build_setting

    plain = build_setting(load_config(SMOKE))
    digest = hashlib.sha256(json.dumps([plain.stream, plain.dedup_stream]).encode()).hexdigest()[:16]
    assert digest == "f7f8156ccfdcc765" and plain.secrets is None
    with_secrets = build_setting(load_config(SMOKE, SECRETS))
    for part in ("natural", "canaries", "control_natural", "control_canaries", "validation"):
        assert getattr(with_secrets, part) == getattr(plain, part), part
    s = with_secrets.secrets
    assert len(s.docs) == 4 and len({t.split(" is ")[0] for t in s.texts + with_secrets.control_secrets.texts}) == 8
    for doc, text, value in zip(s.docs, s.texts, s.values):
        assert len(value) == 6 and value in text and with_secrets.stream.count(doc) == 4
        assert with_secrets.dedup_stream.count(doc) == 1
    assert not any(d in with_secrets.stream for d in with_secrets.control_secrets.docs)
    assert len(with_secrets.stream) == len(plain.stream)


def _local_docs(n):
    rng = random.Random(0)
    words = "the a cat dog sun moon red blue big small ran sat saw found under over tree house river".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(12, 20))) + f" number {i}." for i in range(n)]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_any_local_corpus(tmp_path, suffix):
    docs = _local_docs(150)
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(docs))
    else:
        path.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    assert load_documents(str(path), text_field="body" if suffix == ".jsonl" else "text")[:3] == docs[:3]
    overrides = [f"corpus.source={path}"] + (["corpus.text_field=body"] if suffix == ".jsonl" else [])
    assert main(["run", SMOKE, *overrides, "--out", str(tmp_path / "run")]) == 0
    check_report(tmp_path / "run")


def test_blank_line_separated_documents(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\nsecond doc\n\n\nthird doc\n")
    assert load_documents(str(path)) == ["first doc still first", "second doc", "third doc"]
    with pytest.raises(ValueError, match="3 distinct documents; the config needs 5"):
        load_documents(str(path), 5)


def test_sweep(tmp_path):
    assert main(["sweep", SMOKE, "--sink-fractions", "0.25,0.5", "--active-probs", "0.5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [(p["sink_fraction"], p["sink_active_prob"]) for p in result["points"]] == [(0.25, 0.5), (0.5, 0.5)]
    assert all(math.isfinite(p["gap_closure"]) and p["val_loss_ratio"] > 0 for p in result["points"])
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not key=value"):
        load_config(SMOKE, ["train.steps"])
    with pytest.raises(ValueError, match="unknown runs"):
        load_config(SMOKE, ["runs=[standard,bogus]"])
    with pytest.raises(ValueError, match="sink_fraction"):
        load_config(SMOKE, ["memsinks.sink_fraction=1.5"])
    assert load_config(SMOKE, ["train.steps=7"]).train.steps == 7


def test_the_published_codes_switches_go_under_memsinks_reference():
    from hf_memsinks import PaperReference

    cfg = load_config(SMOKE, ["memsinks.reference.eval_scaling=paper"])
    assert cfg.memsink_config().reference == PaperReference(eval_scaling="paper")
    assert cfg.forget_memsink_config().eval_scaling == "paper"
    with pytest.raises(ValueError, match="'memsinks.eval_scaling' is one of the published code's switches: write it "
                                         "as 'memsinks.reference.eval_scaling'"):
        load_config(SMOKE, ["memsinks.eval_scaling=paper"])
    with pytest.raises(ValueError, match=r"PaperReference\.mask_scheme"):
        load_config(SMOKE, ["memsinks.reference.mask_scheme=md5"])


def test_embedded_corpus_has_variety():
    stories = embedded_stories(100_000, seed=3)
    assert len(set(stories)) == 100_000
    assert stories[:5] == embedded_stories(5, seed=3)
    assert all(s.endswith((".", "!", '"')) for s in stories[:100])


def test_posthoc_zeroes_the_top_scored_neurons():
    from tiny_models import tiny_model

    model = tiny_model("gpt2")
    scores = [torch.arange(64.0), torch.arange(64.0) + 100]  # layer 1 neurons score highest
    pruned = zero_top_neurons(model, scores, 0.25)  # 32 of 128 neurons: layer 1's top 32
    w = pruned.transformer.h[1].mlp.c_proj.weight  # Conv1D: (width, hidden)
    assert torch.all(w[32:] == 0) and torch.all(w[:32] != 0)
    assert torch.equal(pruned.transformer.h[0].mlp.c_proj.weight, model.transformer.h[0].mlp.c_proj.weight)


@pytest.mark.parametrize("name", ["demo", "demo_wide", "manpages", "smoke", "sweep_small", "tinystories_gpu"])
def test_shipped_configs_load(name):
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    assert cfg.train.steps > 0 and cfg.model.type in ("gpt2", "llama", "gpt_neox")


def test_zero_general_sightings_label_only_the_repeated_documents():
    """Under general_sightings=0 the benchmark gives an ID only to documents that occur more than
    once in the stream, so the general path trains on the rest."""
    from benchmarks.memorization.setting import build_setting
    from benchmarks.memorization.training import build_model, train
    from hf_memsinks import MemSinkConfig, get_memsink_model
    from hf_memsinks.data import ids_for_documents

    cfg = load_config(SMOKE)
    setting = build_setting(cfg)
    model = get_memsink_model(build_model(cfg, len(setting.tokenizer), setting.max_length),
                              MemSinkConfig(general_sightings=0))
    train(model, setting, setting.stream, cfg, with_ids=True, label="zero")
    repeated = {d for d in map(tuple, setting.stream) if setting.stream.count(list(d)) > 1}
    seen = set(model.memsink.routing.sightings.ids.tolist())
    assert seen and seen <= set(ids_for_documents([list(d) for d in repeated]).tolist())
    used = setting.stream[:cfg.train.steps * cfg.train.batch_size]
    assert model.memsink.routing.general_rows == sum(setting.stream.count(d) == 1 for d in used) > 0


def test_repeated_only_ids_label_only_the_repeated_documents():
    """``train.repeated_only_ids`` gives the IDs ``add_sequence_ids(..., repeated_only=True)`` gives: the
    forwards (counted here under sinks_from_sighting) see only the repeated documents' IDs."""
    import dataclasses

    from benchmarks.memorization.setting import build_setting
    from benchmarks.memorization.training import build_model, train
    from hf_memsinks import MemSinkConfig, get_memsink_model
    from hf_memsinks.data import ids_for_documents

    cfg = load_config(SMOKE)
    setting = build_setting(cfg)
    repeated = {d for d in map(tuple, setting.stream) if setting.stream.count(list(d)) > 1}
    repeated_ids = set(ids_for_documents([list(d) for d in repeated]).tolist())
    for only in (False, True):
        model = get_memsink_model(build_model(cfg, len(setting.tokenizer), setting.max_length),
                                  MemSinkConfig(sinks_from_sighting=2))
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, repeated_only_ids=only))
        train(model, setting, setting.stream, run_cfg, with_ids=True, label="ids")
        seen = set(model.memsink.routing.sightings.ids.tolist())
        assert (seen <= repeated_ids) == only and seen & repeated_ids
