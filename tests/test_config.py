"""MemSinkConfig: validation names the field; every setting documented; the published code's switches in
one PaperReference; JSON and directory round-trips, in the new form and the one saved before it."""

import dataclasses
import json

import pytest

from hf_memsinks import MemSinkConfig, PaperReference
from hf_memsinks.checkpoints.layout_record import LayoutRecord
from hf_memsinks.config import RECORD_KEYS, REFERENCE_SWITCHES

FLAT_DEFAULTS = {"eval_scaling": "none", "mask_scheme": "hash", "per_layer_masks": False}


def test_json_and_directory_round_trip(tmp_path):
    cfg = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.1, mode="add", layers=[0, -1], salt=7,
                        reference=PaperReference(eval_scaling="paper", per_layer_masks=True),
                        require_sequence_ids=False,
                        target_modules={"mlp": "mlp", "in_proj": "up_proj", "out_proj": "down_proj"})
    assert MemSinkConfig.from_json_string(cfg.to_json_string()) == cfg
    assert MemSinkConfig.from_dict(cfg.to_dict()) == cfg and MemSinkConfig(**cfg.to_dict()) == cfg
    cfg.save_pretrained(tmp_path)
    assert MemSinkConfig.from_pretrained(tmp_path) == cfg
    saved = json.loads((tmp_path / "memsink_config.json").read_text())
    assert saved["sink_fraction"] == 0.25
    assert saved["reference"] == {"eval_scaling": "paper", "mask_scheme": "hash", "per_layer_masks": True}
    assert not set(saved) & set(REFERENCE_SWITCHES)


def test_a_config_without_reference_saves_no_reference_key():
    saved = json.loads(MemSinkConfig(sink_fraction=0.4).to_json_string())
    assert "reference" not in saved and not set(saved) & set(REFERENCE_SWITCHES + RECORD_KEYS)
    assert MemSinkConfig.from_json_string(json.dumps(saved)) == MemSinkConfig(sink_fraction=0.4)


def test_every_user_setting_has_help():
    for kind in (MemSinkConfig, PaperReference):
        for f in dataclasses.fields(kind):
            assert len(f.metadata.get("help", "")) > 30, f"{kind.__name__}.{f.name} has no help"
    names = [f.name for f in dataclasses.fields(MemSinkConfig)]
    assert "reference" in names and not set(names) & set(REFERENCE_SWITCHES + RECORD_KEYS)
    assert len(MemSinkConfig.__doc__.splitlines()) < 10


@pytest.mark.parametrize("kwargs, field", [
    (dict(sink_fraction=0.0), "sink_fraction"),
    (dict(sink_fraction=1.0), "sink_fraction"),
    (dict(sink_fraction=True), "sink_fraction"),
    (dict(sink_active_prob=1.5), "sink_active_prob"),
    (dict(sink_active_prob=-0.1), "sink_active_prob"),
    (dict(mode="replace"), "mode"),
    (dict(sink_init="zeros"), "sink_init"),
    (dict(sink_lr_scale=0.5), "sink_lr_scale"),
    (dict(general_sightings=-1), "general_sightings"),
    (dict(sightings_by="url"), "sightings_by"),
    (dict(num_sink_neurons=0), "num_sink_neurons"),
    (dict(layers=[]), "layers"),
    (dict(layers=3), "layers"),
    (dict(salt=2**63), "salt"),
    (dict(init_seed=1.0), "init_seed"),
    (dict(require_sequence_ids=1), "require_sequence_ids"),
    (dict(reference=PaperReference(mask_scheme="reference"), salt=3), "salt"),
    (dict(reference="paper"), "reference"),
    (dict(reference={"eval_scale": "paper"}), "reference"),
    (dict(target_modules={"in_proj": ["up"]}), "target_modules"),
    (dict(target_modules={"in_proj": ["up"], "out_proj": "down", "typo": 1}), "target_modules"),
])
def test_invalid_values_fail_at_construction_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^MemSinkConfig\.{field}: .*\(got "):
        MemSinkConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(eval_scaling="half"), "eval_scaling"),
    (dict(mask_scheme="md5"), "mask_scheme"),
    (dict(per_layer_masks="yes"), "per_layer_masks"),
    (dict(mask_scheme="reference", per_layer_masks=True), "per_layer_masks"),
])
def test_invalid_reference_switches_fail_naming_the_switch(kwargs, field):
    with pytest.raises(ValueError, match=rf"^PaperReference\.{field}: .*\(got "):
        PaperReference(**kwargs)
    with pytest.raises(ValueError, match=rf"^PaperReference\.{field}: "):
        MemSinkConfig(reference=kwargs)


def test_reference_switches_read_as_before_and_ours_are_none():
    assert PaperReference.published() == PaperReference(eval_scaling="paper", mask_scheme="reference")
    cfg = MemSinkConfig(reference=PaperReference.published())
    assert (cfg.eval_scaling, cfg.mask_scheme, cfg.per_layer_masks) == ("paper", "reference", False)
    ours = MemSinkConfig()
    assert ours.reference is None and (ours.eval_scaling, ours.mask_scheme, ours.per_layer_masks) == (
        "none", "hash", False)
    assert MemSinkConfig(reference=PaperReference()) == ours and MemSinkConfig(reference=FLAT_DEFAULTS) == ours
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.reference.eval_scaling = "none"
    with pytest.raises(AttributeError):
        cfg.eval_scaling = "none"


@pytest.mark.parametrize("kwargs", [dict(eval_scaling="paper"), dict(sink_fraction=0.2, per_layer_masks=True)])
def test_the_old_keywords_fail_naming_the_new_spelling(kwargs):
    moved = {k: v for k, v in kwargs.items() if k in REFERENCE_SWITCHES}
    spelled = ", ".join(f"{k}={v!r}" for k, v in moved.items())
    with pytest.raises(TypeError, match=rf"reference=PaperReference\({spelled}\)"):
        MemSinkConfig(**kwargs)
    with pytest.raises(TypeError, match="PaperReference"):
        dataclasses.replace(MemSinkConfig(), **moved)


def test_old_flat_json_loads_to_the_same_config():
    old = {"sink_fraction": 0.25, "sink_active_prob": 0.4, "mode": "split", "layers": None, "salt": 0,
           "num_sink_neurons": None, "require_sequence_ids": True, "init_seed": 0, "hf_memsinks_version": "0.1.0"}
    assert MemSinkConfig.from_dict({**old, **FLAT_DEFAULTS}) == MemSinkConfig(
        sink_fraction=0.25, sink_active_prob=0.4, mode="split")
    published = MemSinkConfig.from_dict({**old, "eval_scaling": "paper", "mask_scheme": "reference",
                                         "per_layer_masks": False})
    assert published.reference == PaperReference.published()
    assert MemSinkConfig.from_dict({**old, "per_layer_masks": True}).reference == PaperReference(per_layer_masks=True)
    assert MemSinkConfig.from_json_string(published.to_json_string()) == published
    with pytest.raises(ValueError, match="inside 'reference'"):
        MemSinkConfig.from_dict({**old, "eval_scaling": "paper", "reference": {"mask_scheme": "reference"}})


def test_a_checkpoint_files_layout_record_is_skipped_by_the_config_and_read_by_the_record(tmp_path):
    layout = {"model.layers.0.mlp": {"layer": 0, "general": 48, "sinks": 16}}
    data = {**MemSinkConfig(sink_fraction=0.25).to_dict(), "sink_layout": layout, "found_mlps": {"specs": []}}
    (tmp_path / "memsink_config.json").write_text(json.dumps(data))
    assert MemSinkConfig.from_pretrained(tmp_path) == MemSinkConfig(sink_fraction=0.25)
    record = LayoutRecord.from_pretrained(tmp_path)
    assert record == LayoutRecord(layout, {"specs": []}) and record.to_dict() == {k: data[k] for k in RECORD_KEYS}
    assert tuple(f.name for f in dataclasses.fields(LayoutRecord)) == RECORD_KEYS
    assert LayoutRecord.from_dict(MemSinkConfig().to_dict()) is None
    assert LayoutRecord.from_dict({"sink_layout": layout}).to_dict() == {"sink_layout": layout}
    (tmp_path / "memsink_config.json").write_text(json.dumps({**data, "sink_layout": [1]}))
    with pytest.raises(ValueError, match="memsink_config.json: the saved sink_layout must map"):
        LayoutRecord.from_pretrained(tmp_path)


def test_zero_sinks_after_rounding_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"MemSinkConfig\.sink_fraction: gives 0 sink neurons"):
        MemSinkConfig(sink_fraction=0.01).num_sinks_for(16)
    assert MemSinkConfig(sink_fraction=0.3).num_sinks_for(100) == (70, 30)
    assert MemSinkConfig(sink_fraction=0.2, mode="add").num_sinks_for(100) == (100, 25)
    assert MemSinkConfig(num_sink_neurons=8).num_sinks_for(100) == (92, 8)


def test_unknown_json_field_is_rejected():
    with pytest.raises(ValueError, match="unknown fields 'sinks'"):
        MemSinkConfig.from_dict({"sink_fraction": 0.3, "sinks": 4})
    with pytest.raises(ValueError, match=r"unknown fields 'refrence' \(did you mean 'reference'\?\)"):
        MemSinkConfig.from_dict({"refrence": {}})


def test_paper_scaling_value():
    cfg = MemSinkConfig(sink_fraction=0.3, sink_active_prob=0.3, reference=PaperReference(eval_scaling="paper"))
    assert cfg.general_eval_scale == (0.7 + 0.3) / 0.7
    assert MemSinkConfig().general_eval_scale == 1.0
