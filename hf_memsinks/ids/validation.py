"""The one validation of sequence IDs, used wherever IDs enter the library.

Callers: the patched model's forward (``sequence_ids=``, also checked against the batch),
``set_sink_mode`` / ``sink_mode``, ``remove_sinks(forget_ids=)`` and ``forget_sinks``, the mask
functions (dtype only), the collators of :mod:`hf_memsinks.data` and ``add_sequence_ids(by="ids")``.
One rule everywhere:

* IDs are integers: Python ``int``, NumPy or torch integer types. Floats are refused even when
  they hold a whole number (``5.0`` usually means a column that went through a float type, and
  ``5.7`` must never become ``5``); so are ``bool``, strings, ``None`` and objects.
* Every ID fits in int64. Python ints outside ``[-2**63, 2**63)`` and unsigned values
  ``>= 2**63`` (``np.uint64``, ``torch.uint64``) are refused, never wrapped.
* ``-1`` (:data:`NO_SEQUENCE`) means "no sequence": no sink active (padding,
  unlabeled text). Any other negative ID is an error: ``-100`` (the label padding value) is a
  typical slip, and a negative ID would otherwise switch sinks on like a real document.

Values are read on the host. For a tensor that already lives on an accelerator, reading its
values would synchronise the device on every forward (and inside ``torch.compile`` it would break
the graph), so ``check_values="host"`` (what forward uses) reads values only of host tensors in
eager mode; the mask functions treat *every* negative ID as "no sequence", so an unchecked
``-100`` on a GPU still switches no sink on.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

NO_SEQUENCE = -1  # the ID of "no sequence": no sink active
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_RULE = "sequence IDs are integers >= 0, or -1 (NO_SEQUENCE) for no sequence"


def _type_error(name: str, what: str) -> TypeError:
    return TypeError(f"{name} must hold integer sequence IDs, got {what} ({_RULE})")


def _check_python(value: Any, name: str, depth: int = 0) -> None:
    """Walk a (nested) list/tuple of Python or NumPy scalars; every leaf must be an int in int64."""
    if isinstance(value, (list, tuple)):
        if depth > 2:
            raise ValueError(f"{name} is nested too deeply: IDs have shape (batch,) or (batch, seq_len)")
        for item in value:
            _check_python(item, name, depth + 1)
        return
    if isinstance(value, (bool, np.bool_)):
        raise _type_error(name, f"the bool {value!r}")
    if isinstance(value, (int, np.integer)):
        if not INT64_MIN <= int(value) <= INT64_MAX:
            raise ValueError(f"{name}: ID {int(value)} does not fit in int64 ({_RULE})")
        return
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        check_id_dtype(value, name)
        return
    if value is None:
        raise _type_error(name, "None")
    if isinstance(value, (float, np.floating, complex, np.complexfloating)):
        raise _type_error(name, f"the float {value!r}")
    raise _type_error(name, f"a value of type {type(value).__name__} ({value!r:.40})")


def check_id_dtype(t: torch.Tensor, name: str = "sequence_ids") -> None:
    """Refuse a tensor whose dtype cannot hold IDs (bool, float, complex); its values are not read."""
    if t.dtype == torch.bool:
        raise _type_error(name, "a bool tensor")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise _type_error(name, f"a tensor of dtype {t.dtype} (cast with .long() only if the values are whole IDs)")


def _from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    kind = a.dtype.kind
    if kind == "b":
        raise _type_error(name, "a bool array")
    if kind in "fc":
        raise _type_error(name, f"an array of dtype {a.dtype}")
    if kind == "O":
        _check_python(a.tolist(), name)
        return torch.tensor(a.tolist(), dtype=torch.long)
    if kind not in "iu":
        raise _type_error(name, f"an array of dtype {a.dtype}")
    if kind == "u" and a.size and int(a.max()) > INT64_MAX:
        raise ValueError(f"{name}: ID {int(a.max())} (unsigned) does not fit in int64 ({_RULE})")
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.int64, copy=False))


def check_sequence_ids(value: Any, name: str = "sequence_ids", *, check_values: str = "always") -> torch.Tensor:
    """``value`` as an int64 tensor of sequence IDs (same shape, same device), or an error naming
    ``name`` and what is wrong.

    ``check_values``: ``"always"`` reads the values (range, negative IDs) wherever they are;
    ``"host"`` only when they are on the CPU and no ``torch.compile`` trace is running (no device
    synchronisation and no graph break: forward's choice).
    """
    if isinstance(value, torch.Tensor):
        t = value
        check_id_dtype(t, name)
        if t.dtype == getattr(torch, "uint64", None):
            if check_values == "always" or t.device.type == "cpu":
                if t.numel() and bool((t.view(torch.long) < 0).any()):
                    raise ValueError(f"{name}: an unsigned ID >= 2**63 does not fit in int64 ({_RULE})")
    elif isinstance(value, np.ndarray):
        t = _from_numpy(value, name)
    elif isinstance(value, (np.generic, int)) or value is None or isinstance(value, (float, str, bytes)):
        if isinstance(value, (str, bytes)):
            raise _type_error(name, f"the string {value!r:.40}")
        if isinstance(value, np.generic) and not isinstance(value, (np.integer, np.bool_)):
            raise _type_error(name, f"a NumPy {value.dtype}")
        _check_python(value, name)
        t = torch.tensor(int(value), dtype=torch.long)
    elif isinstance(value, (list, tuple)):
        _check_python(value, name)
        try:
            t = torch.tensor(value, dtype=torch.long)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: rows of per-token IDs must all have the same length ({err})") from None
    else:
        raise _type_error(name, f"a {type(value).__name__}")
    if t.dtype != torch.long:
        t = t.long()
    if check_values == "always" or (t.device.type == "cpu" and not torch.compiler.is_compiling()):
        if t.numel() and bool((t < NO_SEQUENCE).any()):
            bad = int(t[t < NO_SEQUENCE].flatten()[0])
            raise ValueError(
                f"{name} holds the negative ID {bad}: {_RULE}; padding uses -1, not -100 (the label pad)"
            )
    return t


def check_id_list(value: Iterable[Any] | torch.Tensor, name: str,
                  if_empty: str = "no sequence IDs given") -> torch.Tensor:
    """A non-empty collection of IDs (tensor, array, list or any iterable) as a flat int64 tensor."""
    if not isinstance(value, (torch.Tensor, np.ndarray, list, tuple)) and isinstance(value, Iterable):
        value = list(value)  # sets, ranges, generators
    ids = check_sequence_ids(value, name).reshape(-1)
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: {if_empty}")
    return ids


def check_batch_ids(value: Any, inputs: torch.Tensor | None, cached: bool = False) -> torch.Tensor | None:
    """A forward's ``sequence_ids`` validated against its ``inputs`` (``input_ids`` or
    ``inputs_embeds``: ``(batch, length, ...)``) and moved to their device; None stays None.

    Per-token IDs longer than the inputs are cut to their last tokens when a KV cache is in use
    (``cached``: a generation step continues the last document)."""
    if value is None:
        return None
    ids = check_sequence_ids(value, "sequence_ids", check_values="host")
    if inputs is None:
        return ids
    batch, length = inputs.shape[0], inputs.shape[1]
    if ids.dim() not in (1, 2):
        raise ValueError(f"sequence_ids must have shape (batch,) or (batch, seq_len), got {tuple(ids.shape)}")
    if ids.shape[0] != batch:
        what = "IDs" if ids.dim() == 1 else "rows"
        raise ValueError(f"sequence_ids has {ids.shape[0]} {what} for a batch of {batch} sequences")
    if ids.dim() == 2 and ids.shape[1] != length:
        if not (cached and ids.shape[1] > length):
            raise ValueError(f"per-token sequence_ids have length {ids.shape[1]} but the inputs have {length} tokens")
        ids = ids[:, -length:]
    return ids.to(inputs.device, non_blocking=True)
