"""MemSinkConfig: validation names the field; JSON and directory round-trips."""

import json

import pytest

from hf_memsinks import MemSinkConfig


def test_json_and_directory_round_trip(tmp_path):
    cfg = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.1, mode="add", layers=[0, -1], salt=7,
                        eval_scaling="paper", per_layer_masks=True, require_sequence_ids=False,
                        target_modules={"mlp": "mlp", "in_proj": "up_proj", "out_proj": "down_proj"})
    assert MemSinkConfig.from_json_string(cfg.to_json_string()) == cfg
    cfg.save_pretrained(tmp_path)
    assert MemSinkConfig.from_pretrained(tmp_path) == cfg
    assert json.loads((tmp_path / "memsink_config.json").read_text())["sink_fraction"] == 0.25


@pytest.mark.parametrize("kwargs, field", [
    (dict(sink_fraction=0.0), "sink_fraction"),
    (dict(sink_fraction=1.0), "sink_fraction"),
    (dict(sink_active_prob=1.5), "sink_active_prob"),
    (dict(sink_active_prob=-0.1), "sink_active_prob"),
    (dict(mode="replace"), "mode"),
    (dict(eval_scaling="half"), "eval_scaling"),
    (dict(mask_scheme="md5"), "mask_scheme"),
    (dict(num_sink_neurons=0), "num_sink_neurons"),
    (dict(layers=[]), "layers"),
    (dict(layers=3), "layers"),
    (dict(mask_scheme="reference", per_layer_masks=True), "per_layer_masks"),
    (dict(mask_scheme="reference", salt=3), "salt"),
    (dict(target_modules={"in_proj": ["up"]}), "target_modules"),
    (dict(target_modules={"in_proj": ["up"], "out_proj": "down", "typo": 1}), "target_modules"),
])
def test_invalid_values_fail_at_construction_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"MemSinkConfig\.{field}"):
        MemSinkConfig(**kwargs)


def test_zero_sinks_after_rounding_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"MemSinkConfig\.sink_fraction: gives 0 sink neurons"):
        MemSinkConfig(sink_fraction=0.01).num_sinks_for(16)
    assert MemSinkConfig(sink_fraction=0.3).num_sinks_for(100) == (70, 30)
    assert MemSinkConfig(sink_fraction=0.2, mode="add").num_sinks_for(100) == (100, 25)
    assert MemSinkConfig(num_sink_neurons=8).num_sinks_for(100) == (92, 8)


def test_unknown_json_field_is_rejected():
    with pytest.raises(ValueError, match="unknown fields"):
        MemSinkConfig.from_dict({"sink_fraction": 0.3, "sinks": 4})


def test_paper_scaling_value():
    cfg = MemSinkConfig(sink_fraction=0.3, sink_active_prob=0.3, eval_scaling="paper")
    assert cfg.general_eval_scale == pytest.approx((0.7 + 0.3) / 0.7)
    assert MemSinkConfig().general_eval_scale == 1.0
