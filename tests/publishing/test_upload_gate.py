"""The upload gate (hf_memsinks/publishing/upload_gate.py) on every upload step of huggingface_hub:
it reads what a file holds (hf_memsinks/publishing/content.py), whatever its name, and refuses sinks.
Uploads are intercepted at huggingface_hub's commit step (tests/fake_hub.py): nothing reaches the
network."""

import copy

import pytest
import torch
from fake_hub import intercept_hub
from test_pushes import patched

from hf_memsinks import SINKS_UPLOAD_CONSENT, SinkUploadError, allow_sinks_upload
from hf_memsinks.publishing.content import inspect

# ---- PEFT ----------------------------------------------------------------------------------------


def test_peft_adapter_on_sink_neurons_is_refused_and_one_beside_them_publishes(monkeypatch, tmp_path):
    peft = pytest.importorskip("peft")
    from hf_memsinks import train_sinks
    from hf_memsinks.cli import audit

    hub = intercept_hub(monkeypatch)
    on_sinks = peft.get_peft_model(patched(), peft.LoraConfig(r=2, target_modules=["c_fc", "c_proj"],
                                                              fan_in_fan_out=True))
    train_sinks(on_sinks)
    with pytest.raises(SinkUploadError, match="adapter weights on sink neurons"):
        on_sinks.push_to_hub("me/adapter")
    assert hub.commits == []
    beside = peft.get_peft_model(patched(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    beside.push_to_hub("me/attn-adapter")
    assert "adapter_model.safetensors" in hub.files("me/attn-adapter")
    beside.save_pretrained(tmp_path / "clean")
    assert not any("sink tensor" in f for f in audit(str(tmp_path / "clean")))  # (audited as a model folder)
    # with the sinks trained beside it, the adapter file holds them (resume keeps them): refused
    train_sinks(beside)
    commits = len(hub.commits)
    with pytest.raises(SinkUploadError, match=r"sink tensors .*c_fc\.sink_.*merge_and_unload\(\) first"):
        beside.push_to_hub("me/attn-adapter-2")
    assert len(hub.commits) == commits
    beside.save_pretrained(tmp_path / "with-sinks")
    assert any("sink tensor" in f and "c_fc.sink_weight" in f for f in audit(str(tmp_path / "with-sinks")))
    merged = copy.deepcopy(on_sinks).merge_and_unload().remove_sinks()
    merged.push_to_hub("me/merged")
    assert hub.sink_tensors() == [] and hub.memsink_files() == []


# ---- the gate reads what a file holds, on every upload step of huggingface_hub ----------------------


@pytest.fixture
def folders(tmp_path):
    """A memsink checkpoint (with its sinks) and the sink-free model of the same weights."""
    model = patched()
    model.save_pretrained(tmp_path / "ckpt")
    model.remove_sinks().save_pretrained(tmp_path / "clean")
    return tmp_path / "ckpt", tmp_path / "clean"


def nothing_left(hub):
    return hub.preuploads == [] and hub.stored == [] and hub.commits == [] and hub.buckets == []


def test_upload_file_of_sink_weights_under_another_name_is_refused(folders, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    from hf_memsinks.publishing import upload_gate

    ckpt, clean = folders
    hub = intercept_hub(monkeypatch, existing={"me/w": False})
    weights = ckpt / "model.safetensors"
    with open(weights, "rb") as f:
        for source in (str(weights), weights.read_bytes(), f):
            for upload in (HfApi().upload_file, huggingface_hub.upload_file):
                with pytest.raises(SinkUploadError, match=r"weights\.st \(sink tensors transformer\.h\.0\.mlp"):
                    upload(path_or_fileobj=source, path_in_repo="weights.st", repo_id="me/w")
        assert f.tell() == 0  # the file object was put back where it was
    assert nothing_left(hub)
    read = []
    monkeypatch.setattr(upload_gate, "inspect", lambda name, source: read.append(name) or inspect(name, source))
    HfApi().upload_file(path_or_fileobj=str(clean / "model.safetensors"), path_in_repo="weights.st", repo_id="me/w")
    assert read == ["weights.st"]  # create_commit's check; its own preupload_lfs_files does not read it again
    assert [name for _, name, _ in hub.stored] == ["model.safetensors"] and "weights.st" in hub.files("me/w")
    assert hub.leaks() == []


@pytest.mark.parametrize("kind", ["tar.gz", "tar.xz", "zip", "nested"])
def test_upload_file_of_an_archive_of_a_sink_checkpoint_is_refused(folders, tmp_path, monkeypatch, kind):
    import shutil
    import tarfile

    from huggingface_hub import HfApi

    ckpt, clean = folders
    hub = intercept_hub(monkeypatch, existing={"me/a": False})

    def archive(folder, name):
        if kind == "zip":
            return shutil.make_archive(str(tmp_path / name), "zip", folder.parent, folder.name)
        mode = "w:xz" if kind == "tar.xz" else "w:gz"
        path = tmp_path / f"{name}.{'tar.xz' if kind == 'tar.xz' else 'tar.gz'}"
        with tarfile.open(path, mode) as tar:
            tar.add(folder, arcname=folder.name)
        if kind == "nested":  # a tar.gz inside a zip
            return shutil.make_archive(str(tmp_path / f"{name}-outer"), "zip", tmp_path, path.name)
        return str(path)

    with pytest.raises(SinkUploadError) as refused:
        HfApi().upload_file(path_or_fileobj=archive(ckpt, "ckpt"), path_in_repo="backup.bin", repo_id="me/a")
    assert "ckpt/model.safetensors (sink tensors" in str(refused.value)
    assert "ckpt/memsink_config.json (memsink metadata)" in str(refused.value)
    assert nothing_left(hub)
    HfApi().upload_file(path_or_fileobj=archive(clean, "clean"), path_in_repo="backup.bin", repo_id="me/a")
    assert "backup.bin" in hub.files("me/a") and len(hub.stored) == 1 and hub.leaks() == []


def _explode():
    raise AssertionError("the gate unpickled a file")


class Explosive:
    def __reduce__(self):
        return (_explode, ())


def test_torch_checkpoints_and_pickles_are_read_without_being_loaded(folders, tmp_path, monkeypatch):
    import pickle

    from huggingface_hub import HfApi

    hub = intercept_hub(monkeypatch, existing={"me/t": False})
    model = patched()
    torch.save(model.state_dict(), tmp_path / "zip.bin")
    torch.save(model.state_dict(), tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save(model, tmp_path / "module.pt")  # a pickled patched model: hf_memsinks classes, sink parameters
    sources = [str(tmp_path / n) for n in ("zip.bin", "legacy.bin", "module.pt")]
    sources.append(pickle.dumps({"transformer.h.0.mlp.c_fc.sink_weight": Explosive()}))
    for source in sources:
        with pytest.raises(SinkUploadError, match="pickled sink tensors or hf_memsinks objects"):
            HfApi().upload_file(path_or_fileobj=source, path_in_repo="pytorch_model.bin", repo_id="me/t")
    assert nothing_left(hub)
    torch.save(model.remove_sinks().state_dict(), tmp_path / "plain.bin")
    HfApi().upload_file(path_or_fileobj=str(tmp_path / "plain.bin"), path_in_repo="pytorch_model.bin", repo_id="me/t")
    assert "pytorch_model.bin" in hub.files("me/t") and hub.leaks() == []


def test_preupload_lfs_files_called_directly_is_refused_before_any_byte(folders, monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi, preupload_lfs_files

    ckpt, clean = folders
    hub = intercept_hub(monkeypatch, existing={"me/p": False, "me/private": True})

    def additions(folder):
        return [CommitOperationAdd(path_in_repo=f"shard-{i}.bin", path_or_fileobj=str(folder / "model.safetensors"))
                for i in range(2)]

    for preupload in (HfApi().preupload_lfs_files, preupload_lfs_files):
        with pytest.raises(SinkUploadError, match="preupload_lfs_files to me/p refused"):
            preupload("me/p", additions=additions(ckpt))
    assert nothing_left(hub)  # not even the 512-byte samples of the preupload call
    with allow_sinks_upload("me/p", SINKS_UPLOAD_CONSENT), pytest.raises(SinkUploadError, match="not private"):
        HfApi().preupload_lfs_files("me/p", additions=additions(ckpt))
    assert nothing_left(hub)

    ops = additions(clean)
    HfApi().preupload_lfs_files("me/p", additions=ops)  # frees the bytes it sent (free_memory=True)
    assert [name for _, name, _ in hub.stored] == ["model.safetensors"] * 2
    HfApi().create_commit("me/p", operations=ops, commit_message="shards")  # what was let through commits
    assert set(hub.files("me/p")) == {"shard-0.bin", "shard-1.bin"} and hub.leaks() == []

    with allow_sinks_upload("me/private", SINKS_UPLOAD_CONSENT):  # the opt-in, private repository
        ops = additions(ckpt)
        HfApi().preupload_lfs_files("me/private", additions=ops)
    HfApi().create_commit("me/private", operations=ops, commit_message="private copy")
    assert set(hub.files("me/private")) == {"shard-0.bin", "shard-1.bin"} and hub.leaks()


def test_bucket_uploads_are_refused_with_sinks_and_sync_a_clean_folder(folders, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    ckpt, clean = folders
    hub = intercept_hub(monkeypatch, existing={"me/bucket": False, "me/vault": True})
    api = HfApi()
    weights = ckpt / "model.safetensors"
    for add in ([(str(weights), "m/model.safetensors")], [(weights.read_bytes(), "blob")]):
        for batch in (api.batch_bucket_files, huggingface_hub.batch_bucket_files):
            with pytest.raises(SinkUploadError, match=r"batch_bucket_files to me/bucket refused.*sink tensors"):
                batch("me/bucket", add=add)
    for sync in (api.sync_bucket, huggingface_hub.sync_bucket):
        with pytest.raises(SinkUploadError, match="memsink_config.json"):
            sync(str(ckpt), "hf://buckets/me/bucket/run", quiet=True)
    with allow_sinks_upload("me/bucket", SINKS_UPLOAD_CONSENT):
        with pytest.raises(SinkUploadError, match=r"not private.*update_bucket_settings"):
            api.sync_bucket(str(ckpt), "hf://buckets/me/bucket", quiet=True)
    assert nothing_left(hub)

    api.sync_bucket(str(clean), "hf://buckets/me/bucket/run", quiet=True)
    assert "run/model.safetensors" in hub.buckets[-1]["files"] and hub.leaks() == []
    with allow_sinks_upload("me/vault", SINKS_UPLOAD_CONSENT):
        api.sync_bucket(str(ckpt), "hf://buckets/me/vault", quiet=True)
    assert hub.buckets[-1]["bucket_id"] == "me/vault" and "memsink_config.json" in hub.buckets[-1]["files"]


def test_upload_folder_over_xet_is_refused_and_a_clean_folder_streams(folders, monkeypatch):
    from huggingface_hub import HfApi

    ckpt, clean = folders
    hub = intercept_hub(monkeypatch, existing={"me/x": False}, xet=True)
    with pytest.raises(SinkUploadError, match="upload_folder to me/x refused"):
        HfApi().upload_folder(repo_id="me/x", folder_path=str(ckpt))
    assert nothing_left(hub)
    HfApi().upload_folder(repo_id="me/x", folder_path=str(clean))
    assert "model.safetensors" in [name for _, name, _ in hub.stored] and "config.json" in hub.files("me/x")
    assert hub.leaks() == []
