"""The push paths refuse a model with sinks before anything is written (hf_memsinks/publishing/pushes.py):
the patched model's push_to_hub and save_pretrained(push_to_hub=True), every Trainer with
push_to_hub=True (PushGuard), MemSinkCallback's take-over of the Trainer's pushes; the opt-in uploads to
a private repository only; the sink-free model publishes. Uploads are intercepted at huggingface_hub's
commit step (tests/fake_hub.py): nothing reaches the network."""

import copy

import pytest
import torch
from datasets import Dataset
from fake_hub import intercept_hub
from tiny_models import tiny_model
from transformers import Trainer, TrainingArguments

from hf_memsinks import SINKS_UPLOAD_CONSENT, MemSinkConfig, SinkUploadError, allow_sinks_upload, get_memsink_model
from hf_memsinks.data import MemSinkDataCollator, add_sequence_ids
from hf_memsinks.integrations.trainer import MemSinkCallback

CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)


def patched():
    torch.manual_seed(0)
    return get_memsink_model(tiny_model("gpt2"), CFG)


def data(n=16):
    g = torch.Generator().manual_seed(0)
    return add_sequence_ids(Dataset.from_dict({"input_ids": torch.randint(3, 97, (n, 12), generator=g).tolist()}))


def trainer(model, out, callbacks=None, **kw):
    kw = {"output_dir": str(out), "per_device_train_batch_size": 4, "report_to": [], "use_cpu": True,
          "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "disable_tqdm": True, "push_to_hub": True,
          "hub_model_id": "me/run", **kw}
    args = TrainingArguments(**kw)
    return Trainer(model=model, args=args, train_dataset=data(), data_collator=MemSinkDataCollator(pad_token_id=0),
                   callbacks=callbacks)


# ---- the model's own upload paths ------------------------------------------------------------------


def test_push_to_hub_of_a_patched_model_is_refused_before_anything_is_created(monkeypatch):
    hub = intercept_hub(monkeypatch)
    with pytest.raises(SinkUploadError, match=r"remove_sinks\(\).*hf-memsinks export"):
        patched().push_to_hub("me/x")
    assert hub.created == [] and hub.commits == []


def test_save_pretrained_push_to_hub_is_refused_before_writing(tmp_path, monkeypatch):
    hub = intercept_hub(monkeypatch)
    with pytest.raises(SinkUploadError, match="memorized training data"):
        patched().save_pretrained(tmp_path / "ckpt", push_to_hub=True, repo_id="me/x")
    assert not (tmp_path / "ckpt").exists() and hub.created == [] and hub.commits == []


def test_the_sink_free_model_publishes(tmp_path, monkeypatch):
    hub = intercept_hub(monkeypatch)
    plain = patched().remove_sinks()
    plain.push_to_hub("me/clean")
    plain.save_pretrained(tmp_path / "plain", push_to_hub=True, repo_id="me/clean2")
    for repo in ("me/clean", "me/clean2"):
        files = hub.files(repo)
        assert "model.safetensors" in files and "config.json" in files, files
        assert "transformer.h.0.mlp.c_fc.weight" in files["model.safetensors"]
    assert hub.sink_tensors() == [] and hub.memsink_files() == []


def test_opt_in_uploads_everything_to_a_private_repo_only(tmp_path, monkeypatch):
    hub = intercept_hub(monkeypatch, existing={"me/public": False})
    model = patched()
    with pytest.raises(ValueError, match="must be exactly"):
        model.push_to_hub("me/x", allow_sinks_upload="yes")
    with pytest.raises(ValueError, match="private repositories only"):
        model.push_to_hub("me/x", allow_sinks_upload=SINKS_UPLOAD_CONSENT, private=False)
    with pytest.raises(SinkUploadError, match="not private"):  # an existing public repo stays untouched
        model.push_to_hub("me/public", allow_sinks_upload=SINKS_UPLOAD_CONSENT)
    assert hub.commits == []
    model.push_to_hub("me/private", allow_sinks_upload=SINKS_UPLOAD_CONSENT)
    model.save_pretrained(tmp_path / "ckpt", push_to_hub=True, repo_id="me/private2",
                          allow_sinks_upload=SINKS_UPLOAD_CONSENT)
    for repo in ("me/private", "me/private2"):
        assert hub.repos[repo] is True and (repo, True) in hub.created
        assert hub.memsink_files(repo) == ["memsink_config.json"]  # resumable: the layout travels too
        assert hub.sink_tensors(repo)
    # the permission ended with the call
    with pytest.raises(SinkUploadError):
        from huggingface_hub import HfApi
        HfApi().upload_folder(repo_id="me/private", folder_path=str(tmp_path / "ckpt"))


def test_the_gate_refuses_a_checkpoint_folder_uploaded_by_hand(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, upload_folder

    hub = intercept_hub(monkeypatch)
    patched().save_pretrained(tmp_path / "ckpt")
    readme = (tmp_path / "ckpt" / "README.md").read_text()
    assert "holds memorized training data" in readme and "private" in readme
    HfApi().create_repo("me/ckpt", private=True)
    for upload in (HfApi().upload_folder, upload_folder):
        with pytest.raises(SinkUploadError, match="sink tensors"):
            upload(repo_id="me/ckpt", folder_path=str(tmp_path / "ckpt"))
    HfApi().upload_folder(repo_id="me/ckpt", folder_path=str(tmp_path / "ckpt"), allow_patterns=["config.json"])
    with allow_sinks_upload("me/ckpt", SINKS_UPLOAD_CONSENT):
        HfApi().upload_folder(repo_id="me/ckpt", folder_path=str(tmp_path / "ckpt"))
    assert hub.sink_tensors("me/ckpt") and hub.memsink_files("me/ckpt") == ["memsink_config.json"]


# ---- Trainer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_trainer_push_to_hub_without_the_callback_is_refused_when_training_starts(tmp_path, monkeypatch, strategy):
    hub = intercept_hub(monkeypatch)
    model = patched()
    before = copy.deepcopy(model.state_dict())
    t = trainer(model, tmp_path, hub_strategy=strategy)
    with pytest.raises(SinkUploadError, match=r"MemSinkCallback\(export_dir=\.\.\.\)"):
        t.train()
    assert t.state.global_step == 0 and hub.commits == []  # before the first step and save
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_upload_gate_still_stops_a_push_the_start_check_cannot_see(tmp_path, monkeypatch):
    """push_to_hub switched on after training started (here: by hand) meets the gate at the push."""
    hub = intercept_hub(monkeypatch)
    t = trainer(patched(), tmp_path, push_to_hub=False)
    t.train()
    t.args.push_to_hub = True
    with pytest.raises(SinkUploadError, match="sink tensors"):
        t.push_to_hub()
    assert hub.sink_tensors() == [] and hub.memsink_files() == []


def test_trainer_push_to_hub_at_the_end_is_refused(tmp_path, monkeypatch):
    hub = intercept_hub(monkeypatch)
    t = trainer(patched(), tmp_path, hub_strategy="end")
    with pytest.raises(SinkUploadError):
        t.push_to_hub()
    assert hub.commits == []


def test_callback_pushes_only_the_audited_export(tmp_path, monkeypatch):
    hub = intercept_hub(monkeypatch)
    model = patched()
    t = trainer(model, tmp_path / "run", callbacks=[MemSinkCallback(tmp_path / "export")], hub_strategy="checkpoint")
    t.train()
    assert (tmp_path / "run" / "checkpoint-4" / "memsink_config.json").exists()  # local checkpoints keep sinks
    assert len(hub.commits) == 1 and hub.commits[0]["repo_id"] == "me/run", hub.commits
    files = hub.files()
    assert "model.safetensors" in files and not any(p.startswith("last-checkpoint") for p in files)
    assert hub.sink_tensors() == [] and hub.memsink_files() == []
    with pytest.raises(SinkUploadError, match="pushes the sink-free export"):
        t.push_to_hub()
    assert len(hub.commits) == 1


def test_callback_without_export_refuses_push_to_hub_when_training_starts(tmp_path, monkeypatch):
    hub = intercept_hub(monkeypatch)
    t = trainer(patched(), tmp_path, callbacks=[MemSinkCallback()])
    with pytest.raises(SinkUploadError, match="export_dir"):
        t.train()
    assert t.state.global_step == 0 and hub.commits == []


def test_callback_opt_in_pushes_checkpoints_to_a_private_repo_only(tmp_path, monkeypatch):
    hub = intercept_hub(monkeypatch)
    with pytest.raises(SinkUploadError, match="hub_private_repo=True"):
        trainer(patched(), tmp_path / "a", callbacks=[MemSinkCallback(allow_sinks_upload=SINKS_UPLOAD_CONSENT)],
                hub_strategy="checkpoint").train()
    assert hub.commits == []
    t = trainer(patched(), tmp_path / "b", callbacks=[MemSinkCallback(allow_sinks_upload=SINKS_UPLOAD_CONSENT)],
                hub_strategy="checkpoint", hub_private_repo=True, hub_model_id="me/resume")
    t.train()
    t._finish_current_push()
    assert hub.repos["me/resume"] is True
    assert "last-checkpoint/memsink_config.json" in hub.files("me/resume")
    assert hub.sink_tensors("me/resume")
