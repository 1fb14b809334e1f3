"""The README's quickstarts run as written (a local tiny model and tokenizer stand for the Hub name)."""

import re
from pathlib import Path

import torch
from tiny_models import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstarts_run(tmp_path, monkeypatch):
    tiny_model("gpt2", vocab_size=300).save_pretrained(tmp_path / "base")
    from benchmarks.memorization.corpus import embedded_stories, train_tokenizer

    train_tokenizer(embedded_stories(200), vocab_size=300).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3 and all("path/or/hub-name" in b for b in blocks)
    namespace, scratch = {}, {}  # the SFT block goes on from the fine-tuning one; "train from scratch" stands alone
    for block, space in zip(blocks, (namespace, namespace, scratch)):
        exec(block.replace("path/or/hub-name", str(tmp_path / "base")), space)
    namespace.update(scratch)

    from hf_memsinks.cli import audit

    assert namespace["trainer"].state.global_step == 4 and namespace["sft"].state.global_step == 2
    assert (tmp_path / "clean-model" / "model.safetensors").exists() and audit(str(tmp_path / "clean-model")) == []
    assert (tmp_path / "my-memsink-checkpoint" / "memsink_config.json").exists()
    assert type(namespace["reloaded"]).__name__ == "GPT2LMHeadModel"
    x = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        assert torch.allclose(namespace["restored"].eval()(x).logits, namespace["reloaded"](x).logits, atol=1e-5)
