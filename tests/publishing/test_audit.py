"""The audit (hf_memsinks/publishing/audit.py): ``hf-memsinks audit`` and every export's check."""

from hf_memsinks.cli import main
from hf_memsinks.publishing.audit import audit


def test_audit_judges_every_other_file_by_what_it_holds(tmp_path, capsys):
    """The pre-push step before `hf upload`: a folder whose model is clean but that also holds the
    checkpoint's weights under another name, or the checkpoint packed in an archive, fails."""
    import shutil
    import tarfile

    from tiny_models import tiny_model

    from hf_memsinks import MemSinkConfig, get_memsink_model

    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sink_fraction=0.5))
    model.save_pretrained(tmp_path / "ckpt")
    model.remove_sinks().save_pretrained(tmp_path / "out")
    assert audit(str(tmp_path / "out")) == []
    shutil.copy(tmp_path / "ckpt" / "model.safetensors", tmp_path / "out" / "weights.st")
    with tarfile.open(tmp_path / "out" / "backup.tgz", "w:gz") as tar:
        tar.add(tmp_path / "ckpt", arcname="ckpt")
    found = "\n".join(audit(str(tmp_path / "out")))
    assert "weights.st: sink tensor transformer.h.0.mlp.c_fc.sink_weight" in found
    assert "backup.tgz:ckpt/model.safetensors: sink tensor" in found
    assert "backup.tgz:ckpt/memsink_config.json: memsink metadata file" in found
    assert main(["audit", str(tmp_path / "out")]) == 1
