"""hf-memsinks export / audit on real checkpoints."""

import subprocess
import sys

import torch
from test_checkpoints import trained
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
    from hf_memsinks.checkpoints import export

    trained("gpt2").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    audited = []

    def dirty(directory):
        audited.append(directory)
        return ["model.safetensors: sink tensor x.sink_weight"]

    monkeypatch.setattr(export, "audit", dirty)
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--overwrite"]) == 1
    assert "left as it was" in capsys.readouterr().err
    assert audited and ".memsink-tmp-" in audited[0]  # audited in staging, not in place
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".memsink-tmp-" in p.name]  # no staging left behind
