"""The README's usage examples run as written (with a local tiny model for the Hub name)."""

import re
from pathlib import Path

from tiny_models import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    tiny_model("gpt2", vocab_size=300).save_pretrained(tmp_path / "base")
    from hf_memsinks.experiments.corpus import embedded_stories, train_tokenizer

    train_tokenizer(embedded_stories(200), vocab_size=300).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    usage = [b for b in blocks if "path/or/hub-name" in b]
    assert len(usage) == 4
    namespace = {}
    for block in usage:
        exec(block.replace("path/or/hub-name", str(tmp_path / "base")), namespace)
    assert type(namespace["reloaded"]).__name__ == "GPT2LMHeadModel"
    assert (tmp_path / "my-memsink-checkpoint" / "memsink_config.json").exists()
    assert namespace["model"].memsink_config.sink_fraction == 0.3
    from hf_memsinks.cli import audit

    assert (tmp_path / "clean-model" / "model.safetensors").exists() and audit(str(tmp_path / "clean-model")) == []
