"""hf-memsinks export / audit on real checkpoints."""

import subprocess
import sys

import torch
from checkpoints.test_checkpoints import trained
from tiny_models import batch

from hf_memsinks.cli import audit, main


def test_export_writes_a_clean_model_and_audit_flags_checkpoints(tmp_path, capsys):
    model = trained("gpt2")
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["audit", str(tmp_path / "ckpt")]) == 1
    found = "\n".join(audit(str(tmp_path / "ckpt")))
    assert "memsink_config.json" in found and "sink tensor" in found

    proc = subprocess.run([sys.executable, "-m", "hf_memsinks.cli", "export", str(tmp_path / "ckpt"),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert audit(str(tmp_path / "out")) == []
    assert main(["audit", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "sink neurons were removed" in card.lower()

    from transformers import AutoModelForCausalLM

    x = batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=x).logits
    assert (got - expected).abs().max() < 1e-5

    ids = ["1234567890123", "987654321098"]
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "forget"), "--forget-ids", *ids]) == 0
    card = (tmp_path / "forget" / "README.md").read_text()
    assert "2 forgotten sequence IDs" in card and not any(i in card for i in ids)  # a count, never the IDs


def test_an_export_that_fails_its_audit_replaces_nothing(tmp_path, monkeypatch, capsys):
    """The audit runs in the staging directory: a dirty export never reaches the target."""
    from hf_memsinks.publishing import audit as audit_module

    trained("gpt2").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    audited = []

    def dirty(directory):
        audited.append(directory)
        return ["model.safetensors: sink tensor x.sink_weight"]

    monkeypatch.setattr(audit_module, "audit", dirty)
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--overwrite"]) == 1
    assert "left as it was" in capsys.readouterr().err
    assert audited and ".memsink-tmp-" in audited[0]  # audited in staging, not in place
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".memsink-tmp-" in p.name]  # no staging left behind



def test_audit_privacy_on_a_tiny_saved_model(tmp_path, capsys):
    """A model that memorized its documents: every attack's AUC near 1 and the members extracted;
    a memsink checkpoint is audited sink-free; bad inputs are one-line errors (exit 2)."""
    import json

    from evaluation.test_membership import memorize
    from tiny_models import tiny_model

    from benchmarks.memorization.corpus import embedded_stories, train_tokenizer

    stories = embedded_stories(220, seed=5)
    tok = train_tokenizer(stories[:200], vocab_size=300)
    members, controls = stories[200:210], stories[210:220]
    docs = [[tok.bos_token_id] + tok(t)["input_ids"][:23] for t in members]
    torch.manual_seed(0)
    model = memorize(tiny_model("gpt2", vocab_size=300), docs, steps=150)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for name, texts in (("docs", members), ("control", controls)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    args = ["audit-privacy", str(tmp_path / "model"), str(tmp_path / "docs.jsonl"), str(tmp_path / "control.jsonl"),
            "--max-length", "24", "--prefix", "8", "--suffix", "8"]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["members"] == result["controls"] == 10 and result["loaded_as"] == "plain model"
    assert all(auc >= 0.9 for auc in result["auc"].values()), result["auc"]
    extraction = result["extraction"]  # (formulaic stories: half the controls continue as expected too)
    assert extraction["members"]["rate"] > extraction["controls"]["rate"] and extraction["members"]["tried"] == 10
    assert main(args) == 0
    out = capsys.readouterr()
    assert "Min-K%++ (k=20%)" in out.out and "extraction (8-token prefix" in out.out and "audit-privacy" in out.err

    from hf_memsinks import MemSinkConfig, get_memsink_model

    get_memsink_model(tiny_model("gpt2", vocab_size=300), MemSinkConfig()).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    assert main(["audit-privacy", str(tmp_path / "ckpt"), *args[2:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loaded_as"] == "memsink checkpoint, sinks removed"
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    assert main(["audit-privacy", str(tmp_path / "model"), str(tmp_path / "bad.jsonl"),
                 str(tmp_path / "docs.jsonl")]) == 2
    assert "no string field 'text'" in capsys.readouterr().err
    assert main(["audit-privacy", str(tmp_path / "nowhere"), str(tmp_path / "docs.jsonl"),
                 str(tmp_path / "control.jsonl")]) == 2
    assert "not a model directory" in capsys.readouterr().err
