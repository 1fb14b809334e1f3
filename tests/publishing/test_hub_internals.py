"""hf_memsinks/publishing/hub_internals.py wraps every method of huggingface_hub that sends files."""


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
