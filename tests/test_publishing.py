"""Private by default: every ordinary upload path of a model with sinks is refused; the opt-in
uploads to a private repository only; the sink-free model publishes. Uploads are intercepted at
huggingface_hub's commit step (tests/fake_hub.py): nothing reaches the network."""

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
from hf_memsinks.publishing.content import inspect

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


# ---- PEFT ----------------------------------------------------------------------------------------


def test_peft_adapter_on_sink_neurons_is_refused_and_one_beside_them_publishes(monkeypatch):
    peft = pytest.importorskip("peft")
    from hf_memsinks import train_sinks

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


def test_huggingface_hub_sends_files_only_from_the_gated_methods():
    """A tripwire for huggingface_hub upgrades: every function that sends file content (or the
    preupload samples) is reached only from a method the gate wraps. A new caller fails here: gate
    it in hf_memsinks/publishing/hub_internals.py (gate_uploads) and add it below."""
    import ast
    import pathlib

    import huggingface_hub

    from hf_memsinks.publishing.hub_internals import _GATED

    senders = {"_send_commit", "_upload_files", "_upload_xet_files", "_upload_lfs_files", "lfs_upload",
               "post_lfs_batch_info", "_fetch_upload_modes", "new_upload_commit", "start_upload_file",
               "start_upload_bytes", "_batch_bucket_files", "pipelined_upload", "_UploadPipeline"}
    allowed = {f"hf_api.py:HfApi.{name}" for name in _GATED} | {  # and the steps only those reach:
        "hf_api.py:HfApi.batch_bucket_files._send_chunk", "hf_api.py:HfApi._batch_bucket_files",
        "_commit_api.py:_upload_files", "_commit_api.py:_upload_xet_files",
        "_commit_api.py:_upload_lfs_files._wrapped_lfs_upload", "_upload_pipeline.py:pipelined_upload",
        "_upload_pipeline.py:_UploadPipeline._coordinator_loop", "_upload_pipeline.py:_UploadPipeline._do_commit"}
    root = pathlib.Path(huggingface_hub.__file__).parent
    callers = set()

    def visit(node, where, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, where, scope + [child.name])
                continue
            if isinstance(child, ast.Call):
                name = getattr(child.func, "attr", getattr(child.func, "id", None))
                if name in senders:
                    callers.add(f"{where}:{'.'.join(scope)}")
            visit(child, where, scope)

    for path in root.rglob("*.py"):
        visit(ast.parse(path.read_text(encoding="utf-8")), path.relative_to(root).as_posix(), [])
    assert "hf_api.py:HfApi.create_commit" in callers  # the scan sees the known senders
    assert callers <= allowed, f"huggingface_hub sends files from ungated places: {sorted(callers - allowed)}"
