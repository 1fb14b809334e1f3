"""Private by default: nothing that holds sinks leaves the machine by an ordinary upload.

The sinks hold the memorized training data, so a model that still has them, its checkpoints and
a LoRA adapter over its sink neurons are private artifacts. One gate sits on huggingface_hub's
upload methods (``HfApi.create_commit``, ``preupload_lfs_files``, ``upload_folder``, whose streamed
xet path skips the other two, and ``batch_bucket_files``, which every bucket upload goes through;
wrapped by :mod:`.hub_internals`, installed by :mod:`hf_memsinks.global_patches`), so every
Transformers, ``Trainer``, PEFT, ``upload_file`` and ``sync_bucket`` upload meets it before any byte
is sent. It judges each file by what it holds (:mod:`.content`), not by its name: a memsink file, a
sink tensor (in safetensors, a torch checkpoint, a pickle, or an archive of them), or adapter weights
on the sink neurons of a patched model of this process is refused with :class:`SinkUploadError`, unless its
repository was named in :func:`allow_sinks_upload`, and then only if that repository is private.
The earlier checks of :mod:`.pushes` (the patched model's ``push_to_hub``, ``PushGuard``,
``MemSinkCallback``, ``MemSinkSFTTrainer``) refuse the same uploads before anything is written.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterable, Iterator

from torch import nn

from ..checkpoints.format import SINK_KEY_MARKERS
from ..layers.projections import is_patched_projection
from ..unwrap import unwrap
from .content import inspect

SINKS_UPLOAD_CONSENT = "I understand this uploads memorized training data"
FIX = ("Publish the sink-free model instead: model.remove_sinks() (on a copy.deepcopy to keep training; "
       "a PEFT model: merge_and_unload() first), "
       "`hf-memsinks export CHECKPOINT OUT` and push OUT, or MemSinkCallback(export_dir=...), which pushes the "
       "audited export when TrainingArguments(push_to_hub=True). To keep a private copy with sinks (to resume "
       "training elsewhere), opt in by name, private repositories only: "
       "hf_memsinks.allow_sinks_upload(repo_id, hf_memsinks.SINKS_UPLOAD_CONSENT). See docs/publishing.md")


class SinkUploadError(RuntimeError):
    """An upload that would publish memorized training data (sinks), refused."""


# ---- consent: repositories that may receive sinks --------------------------------------------------

_lock = threading.Lock()
_permitted: dict[str, int] = {}  # repo id -> how many open permissions name it


def check_consent(consent: Any, where: str) -> None:
    if consent != SINKS_UPLOAD_CONSENT:
        raise ValueError(f"{where}: allow_sinks_upload must be exactly {SINKS_UPLOAD_CONSENT!r} "
                         f"(hf_memsinks.SINKS_UPLOAD_CONSENT), got {consent!r}")


def permit(repo_id: str) -> None:
    with _lock:
        _permitted[repo_id] = _permitted.get(repo_id, 0) + 1


def revoke(repo_id: str) -> None:
    with _lock:
        _permitted[repo_id] -= 1
        if not _permitted[repo_id]:
            del _permitted[repo_id]


def is_permitted(repo_id: str) -> bool:
    """``name`` (no namespace) also names ``<user>/name``, which is what the Hub makes of it."""
    with _lock:
        return any(repo_id == r or ("/" not in r and repo_id.endswith("/" + r)) for r in _permitted)


@contextlib.contextmanager
def allow_sinks_upload(repo_id: str, consent: str) -> Iterator[None]:
    """Within this block, uploads to ``repo_id`` may carry sinks, if the repository is private.

    For the legitimate case only: a private copy of a checkpoint with sinks, to resume training.
    ``consent`` must be :data:`SINKS_UPLOAD_CONSENT`, word for word."""
    check_consent(consent, f"allow_sinks_upload({repo_id!r})")
    permit(repo_id)
    try:
        yield
    finally:
        revoke(repo_id)


# ---- what would leave: memsink files, sink tensors, adapters on sink neurons ------------------------

_live_models: weakref.WeakSet = weakref.WeakSet()  # patched models of this process (adapter checks)


def register(model: nn.Module) -> None:
    _live_models.add(model)


def holds_sinks(model: Any) -> bool:
    """Whether ``model`` (or the model inside a DDP or PEFT wrapper) still has sinks."""
    return getattr(unwrap(model), "memsink", None) is not None


def _sink_widths() -> dict[str, set[int]]:
    """Module path -> full widths (general + sinks) of every patched projection of live models."""
    out: dict[str, set[int]] = {}
    for model in list(_live_models):
        if getattr(model, "memsink", None) is None:
            continue  # its sinks were removed
        for name, module in model.named_modules():
            if is_patched_projection(module):
                m = module.memsink
                out.setdefault(name.removesuffix(".base_layer"), set()).add(m.general + m.sinks)
    return out


def _adapter_keys_on_sinks(table: dict, widths: dict[str, set[int]]) -> list[str]:
    """PEFT keys (``base_model.model.<module>.lora_A.weight``) of a patched projection with a
    dimension as wide as its general and sink neurons together: those weights act on sinks."""
    found = []
    for key, info in table.items():
        if not key.startswith("base_model.model.") or not isinstance(info, dict):
            continue
        path = key[len("base_model.model."):].split(".")
        for i in range(1, len(path)):
            full = widths.get(".".join(path[:i]))
            if full and path[i] != "base_layer" and full & set(info.get("shape", ())):
                found.append(key)
                break
    return found


def sink_traces(files: Iterable[tuple[str, Any]]) -> list[str]:
    """What in ``files`` (path in the repository, local path, bytes or file object) would publish
    sinks, judged from what each file holds (:func:`.content.inspect`), not from its name: a sink
    tensor or memsink file inside a renamed file, an archive, a torch checkpoint or a pickle counts."""
    traces, widths = [], None
    for path_in_repo, source in files:
        for found in inspect(path_in_repo, source):
            if found.kind == "memsink":
                traces.append(f"{found.where} (memsink metadata)")
            elif found.kind == "unreadable":
                traces.append(f"{found.where} (unreadable {found.detail}; it cannot be checked for sinks)")
            elif found.kind == "keys":
                traces.append(f"{found.where} (pickled sink tensors or hf_memsinks objects {_listed(found.detail)})")
            else:
                sinks = [k for k in found.detail if k.endswith(SINK_KEY_MARKERS)]
                if sinks:
                    traces.append(f"{found.where} (sink tensors {_listed(sinks)})")
                widths = _sink_widths() if widths is None else widths
                adapters = _adapter_keys_on_sinks(found.detail, widths) if widths else []
                if adapters:
                    traces.append(f"{found.where} (adapter weights on sink neurons: {adapters[0]}, ...)")
    return traces


def _listed(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")


def refusal(what: str, traces: list[str]) -> SinkUploadError:
    listed = "; ".join(traces[:3]) + ("; ..." if len(traces) > 3 else "")
    return SinkUploadError(f"{what} refused: it would upload memorized training data held by the sinks "
                           f"({listed}). {FIX}")


def check_upload(api, repo_id: str, repo_type: str | None, token, files: list[tuple[str, Any]], what: str) -> None:
    """The gate: refuse ``files`` if they carry sinks, unless ``repo_id`` is permitted and private."""
    traces = sink_traces(files)
    if not traces:
        return
    if not is_permitted(repo_id):
        raise refusal(f"{what} to {repo_id}", traces)
    try:
        if repo_type == "bucket":
            private = api.bucket_info(repo_id, token=token).private
        else:
            private = api.repo_info(repo_id, repo_type=repo_type, token=token).private
    except Exception as err:  # network, auth: no proof of privacy is a refusal
        raise SinkUploadError(f"{what} to {repo_id} refused: it carries sinks, and the repository could not be "
                              f"checked to be private ({type(err).__name__}: {err})") from None
    if not private:
        settings = "update_bucket_settings" if repo_type == "bucket" else "update_repo_settings"
        raise SinkUploadError(f"{what} to {repo_id} refused: it carries sinks and {repo_id} is not private. "
                              "allow_sinks_upload covers private repositories only: make it private first "
                              f"(HfApi().{settings}(repo_id, private=True)) or use another repository")

