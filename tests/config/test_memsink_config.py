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


def test_per_layer_sink_fractions_round_trip_through_json(tmp_path):
    """JSON writes the dict's layer indices as strings; they come back as ints."""
    cfg = MemSinkConfig.for_finetuning(layers={0: 2 / 3, -1: 0.5})
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "memsink_config.json").read_text())["layers"] == {"0": 2 / 3, "-1": 0.5}
    assert MemSinkConfig.from_pretrained(tmp_path) == cfg and MemSinkConfig.from_dict(cfg.to_dict()) == cfg
    assert [cfg.sink_fraction_for(i, 4) for i in range(4)] == [2 / 3, 0.5, 0.5, 0.5]
    assert cfg.num_sinks_for(512, cfg.sink_fraction_for(0, 4)) == (512, 1024)
    assert cfg.num_sinks_for(512, cfg.sink_fraction_for(3, 4)) == (512, 512)


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
    (dict(layers={}), "layers"),
    (dict(layers={0: 1.0}), "layers"),
    (dict(layers={"first": 0.5}), "layers"),
    (dict(layers={0: 0.5}, num_sink_neurons=8), "num_sink_neurons"),
    (dict(layers={0: 0.5}, reference=PaperReference(eval_scaling="paper")), "layers"),
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



# pickle.dumps(MemSinkConfig(sink_fraction=0.25, per_layer_masks=True, sink_layout={"mlp": {"layer": 0, "general": 3,
# "sinks": 1}}), protocol=4) by the code before the split.
OLD_PICKLE = bytes.fromhex(
    "800495b9010000000000008c1268665f6d656d73696e6b732e636f6e666967948c0d4d656d53696e6b436f6e6669679493942981947d"
    "94288c0d73696e6b5f6672616374696f6e94473fd00000000000008c1073696e6b5f6163746976655f70726f6294473fd33333333333"
    "338c046d6f6465948c046175746f948c066c6179657273944e8c106e756d5f73696e6b5f6e6575726f6e73944e8c0473616c74944b00"
    "8c0c6576616c5f7363616c696e67948c046e6f6e65948c0b6d61736b5f736368656d65948c0468617368948c0f7065725f6c61796572"
    "5f6d61736b7394888c14726571756972655f73657175656e63655f69647394888c09696e69745f73656564944b008c0973696e6b5f69"
    "6e6974948c0672616e646f6d948c0d73696e6b5f6c725f7363616c65944740100000000000008c1167656e6572616c5f736967687469"
    "6e6773944e8c0c7369676874696e67735f6279948c0b6964732b636f6e74656e74948c0e7461726765745f6d6f64756c6573944e8c0b"
    "73696e6b5f6c61796f7574947d948c036d6c70947d94288c056c61796572944b008c0767656e6572616c944b038c0573696e6b73944b"
    "0175738c0a666f756e645f6d6c7073944e75622e"
)


def test_a_config_pickled_before_the_split_unpickles_to_todays():
    import copy
    import pickle

    cfg = MemSinkConfig(sink_fraction=0.25, reference=PaperReference(per_layer_masks=True))
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    old = pickle.loads(OLD_PICKLE)
    assert old == cfg and old.per_layer_masks and not hasattr(old, "sink_layout")
