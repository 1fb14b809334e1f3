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

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "forget"), "--forget-ids", "2", "3"]) == 0
    assert "2, 3" in (tmp_path / "forget" / "README.md").read_text()
