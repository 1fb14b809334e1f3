"""Checkpoints saved before PaperReference and the layout record were split from MemSinkConfig still load.

tests/checkpoints/old_checkpoints/ holds memsink_config.json files that the code before the split saved (its
switches eval_scaling, mask_scheme and per_layer_masks at top level) for tiny models built as below.
Each test saves the same model with today's code, checks what it writes against the old file, then
puts the old file in its place and restores the model from it exactly."""

import json
from pathlib import Path

import pytest
import torch
from test_checkpoints import logits, trained
from tiny_models import batch

from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, PaperReference
from hf_memsinks.config import REFERENCE_SWITCHES

OLD = Path(__file__).resolve().parent / "old_checkpoints"
CASES = {  # file -> (model type, the config its run used, in today's spelling)
    "llama_split_paper": ("llama", MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4, mode="split", salt=5,
                                                 reference=PaperReference(eval_scaling="paper", per_layer_masks=True))),
    "gpt2_add_reference": ("gpt2", MemSinkConfig(mode="add", sink_fraction=0.2, sink_active_prob=0.3,
                                                 reference=PaperReference.published())),
    "gpt2_defaults": ("gpt2", MemSinkConfig()),
}


# fields added since the old files were saved, at the defaults a file without them loads with
ADDED_SINCE = {"compute_active_sinks_only": False, "sink_optimizer": "adamw", "sinks_from_sighting": 1}


def today_form(old: dict) -> dict:
    """The old file's keys as today's code writes them: its switches under ``reference`` unless ours,
    and the fields added since."""
    switches = {k: old.pop(k) for k in REFERENCE_SWITCHES}
    if switches != {"eval_scaling": "none", "mask_scheme": "hash", "per_layer_masks": False}:
        old["reference"] = switches
    return {**ADDED_SINCE, **old}


@pytest.mark.parametrize("name", CASES)
def test_an_old_checkpoint_restores_exactly(tmp_path, name):
    model_type, cfg = CASES[name]
    old_text = (OLD / f"{name}.json").read_text()
    model = trained(model_type, cfg)
    model.save_pretrained(tmp_path)
    new_text = (tmp_path / "memsink_config.json").read_text()
    assert new_text == json.dumps(today_form(json.loads(old_text)), indent=2, sort_keys=True) + "\n"
    if name == "gpt2_defaults":  # a config that never set a switch: the old file less its three default keys
        assert [line for line in old_text.splitlines() if not line.startswith(
            tuple(f'  "{k}"' for k in REFERENCE_SWITCHES))] == [
            line for line in new_text.splitlines() if not line.startswith(tuple(f'  "{k}"' for k in ADDED_SINCE))]

    (tmp_path / "memsink_config.json").write_text(old_text)
    restored = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path).eval()
    resolved = cfg if cfg.mode != "auto" else MemSinkConfig(mode="split")
    assert restored.memsink_config == resolved
    x, ids = batch(), torch.tensor([2, 3, 4])
    for mode, mode_ids, kw in [("drop", None, {}), ("expected", None, {}), ("exclude", [3], {}),
                               ("activate", None, {"sequence_ids": ids})]:
        with model.sink_mode(mode, mode_ids), restored.sink_mode(mode, mode_ids):
            assert torch.equal(logits(model, x, **kw), logits(restored, x, **kw)), mode
    restored.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "memsink_config.json").read_text() == new_text
