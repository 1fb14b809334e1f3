"""Atomic checkpoint writes: a crash at any point leaves the old checkpoint loadable.

:func:`atomic_save` is used by the patched model's ``save_pretrained``, by ``hf-memsinks export``
and by the Trainer callback's export. How it works, and why:

1. Everything is written into a fresh *staging* directory next to the target (same filesystem,
   named ``.<target>.memsink-tmp-*``), then flushed to disk. A crash here leaves the target
   untouched (and a stale staging directory, which is never read).
2. Target missing or empty: one ``rename`` of the staging directory onto it. Atomic.
3. Target holds files: a checkpoint is several files (weights, ``config.json``,
   ``memsink_config.json``) that must change together, and renaming them one by one would pass
   through mixed states (new weights with an old config) that no loader can read. So the
   staging directory is completed into the *whole new directory*: every entry of the target that
   this save does not write is hard-linked into it (same inodes: nothing copied, nothing can be
   lost), and then the two directories are swapped with one ``renameat2(RENAME_EXCHANGE)``
   (Linux): every reader sees either the old directory or the new one. The old tree, now at the
   staging path, is then swept: the old versions of files this save rewrote and the hard links
   are unlinked; anything else (a file created in the target while the save ran) is moved into
   the new directory. No file this save did not write is ever deleted: at worst, after a crash
   in the sweep, the old tree stays next to the target.
4. Where the exchange is not available (not Linux, a filesystem without it, the target a mount
   point), the files are replaced one at a time by atomic renames: weights first, then
   ``config.json``, ``memsink_config.json`` last. Each file is always whole, but a crash midway can
   leave old and new files mixed; the loaders' layout checks then refuse the checkpoint instead
   of loading wrong weights (a warning says this fallback is used).

"Files this save writes" are the files the writer put in the staging directory, plus older
weight files of the same checkpoint that a differently sharded save supersedes (an old
``model.safetensors`` next to a new sharded index would otherwise be loaded in preference).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from typing import Callable

logger = logging.getLogger(__name__)

STAGING_MARK = ".memsink-tmp-"
_WEIGHT_FILE = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$|"
    r"(model|pytorch_model)\.(safetensors|bin)\.index\.json$"
)
# Order of the per-file fallback: what loaders read first goes in last.
_LAST = ("config.json", "memsink_config.json")


def _files(root: str) -> set[str]:
    out = set()
    for base, _, names in os.walk(root):
        for n in names:
            out.add(os.path.relpath(os.path.join(base, n), root))
    return out


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _superseded(target: str, written: set[str]) -> set[str]:
    """Weight files in ``target`` (top level) that the new save replaces without rewriting them."""
    if not any(_WEIGHT_FILE.match(w) for w in written):
        return set()
    return {n for n in os.listdir(target) if _WEIGHT_FILE.match(n) and n not in written
            and os.path.isfile(os.path.join(target, n))}


def _carry_over(target: str, staging: str, skip: set[str]) -> None:
    """Hard-link every file of ``target`` not in ``skip`` into ``staging`` (directories re-created,
    symlinks copied). What cannot be linked is left for the sweep to move."""
    for base, dirs, names in os.walk(target):
        rel_base = os.path.relpath(base, target)
        dest_base = staging if rel_base == "." else os.path.join(staging, rel_base)
        for d in dirs:
            dest = os.path.join(dest_base, d)
            if not os.path.isdir(dest):
                os.mkdir(dest)
                shutil.copystat(os.path.join(base, d), dest, follow_symlinks=False)
        for n in names:
            rel = os.path.normpath(os.path.join(rel_base, n))
            if rel in skip:
                continue
            src, dest = os.path.join(base, n), os.path.join(dest_base, n)
            try:
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dest)
                elif os.path.isfile(src):
                    os.link(src, dest)
            except OSError:
                pass  # the sweep moves it after the exchange


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EBUSY, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {b} into place: {os.strerror(err)}")


def _exchange(staging: str, target: str) -> bool:
    """The commit point (a separate function so crash tests can stop right before it)."""
    return _renameat2_exchange(staging, target)


def _sweep_old(old: str, target: str, rewritten: set[str]) -> None:
    """After the exchange ``old`` holds the previous tree: unlink what the new tree holds
    (hard links) or replaced (``rewritten``), move anything else into the new tree."""
    kept = []
    for base, dirs, names in os.walk(old, topdown=False):
        for n in names:
            src = os.path.join(base, n)
            rel = os.path.relpath(src, old)
            dest = os.path.join(target, rel)
            if rel in rewritten:
                os.unlink(src)
            elif os.path.lexists(dest) and not os.path.islink(src) and os.path.samefile(src, dest):
                os.unlink(src)
            elif os.path.islink(src) and os.path.islink(dest) and os.readlink(src) == os.readlink(dest):
                os.unlink(src)
            elif not os.path.lexists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(src, dest)
            else:
                kept.append(rel)
        for d in dirs:
            try:
                os.rmdir(os.path.join(base, d))
            except OSError:
                pass
    try:
        os.rmdir(old)
    except OSError:
        logger.warning("hf_memsinks: %s kept files that the new save at %s also has: %s", old, target, kept[:5])


def _replace_files(staging: str, target: str, written: set[str], superseded: set[str]) -> None:
    logger.warning("hf_memsinks: cannot swap directories atomically at %s; replacing files one by one", target)
    order = sorted(written, key=lambda r: (r in _LAST, _LAST.index(r) if r in _LAST else 0, r))
    weights_done = False
    for rel in order:
        if not weights_done and rel in _LAST:
            for stale in superseded:  # before config.json: new config never meets old weights
                os.unlink(os.path.join(target, stale))
            weights_done = True
        dest = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.replace(os.path.join(staging, rel), dest)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            tmp = dest + STAGING_MARK + "part"
            shutil.copy2(os.path.join(staging, rel), tmp)
            _fsync(tmp)
            os.replace(tmp, dest)
    if not weights_done:
        for stale in superseded:
            os.unlink(os.path.join(target, stale))
    _fsync(target, directory=True)
    shutil.rmtree(staging, ignore_errors=True)


def atomic_save(target: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Run ``write(directory)`` into a staging directory, then put its files in place at
    ``target`` atomically (see the module docstring). Returns the target path."""
    target = os.path.realpath(os.fspath(target))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target} exists and is not a directory")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}{STAGING_MARK}", dir=parent)
    swapped = False
    try:
        write(staging)
        written = _files(staging)
        for rel in written:
            _fsync(os.path.join(staging, rel))
        _fsync(staging, directory=True)
        if not os.path.isdir(target) or not os.listdir(target):
            umask = os.umask(0)
            os.umask(umask)
            mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else 0o777 & ~umask
            os.chmod(staging, mode)
            os.rename(staging, target)  # replaces a missing or empty directory atomically
            _fsync(parent, directory=True)
            return target
        superseded = _superseded(target, written)
        _carry_over(target, staging, written | superseded)
        os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
        swapped = _exchange(staging, target)
        if not swapped:
            _replace_files(staging, target, written, superseded)
            return target
        _fsync(parent, directory=True)
        _sweep_old(staging, target, written | superseded)
        return target
    except BaseException:
        if not swapped:  # staging holds only new files and hard links: removing it loses nothing
            shutil.rmtree(staging, ignore_errors=True)
        raise
