"""``hf-memsinks install-hook``: a git pre-push hook that refuses a push that would carry sinks.

The upload gate lives in a Python process that imported hf_memsinks; ``git push`` (to a Hub
repository or any remote) never is one. The hook runs ``hf-memsinks audit --git-push`` on what the
push would send: every file (blob) of the pushed commits that the remote does not have yet, in
history too (a sink file added and deleted again is still pushed), a Git LFS pointer read through
to its local object. Each is judged as the gate judges an upload (:func:`.upload_gate.sink_traces`).
A pre-push hook already there (Git LFS's) is kept and runs after the check.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from typing import Iterable, Iterator

from .upload_gate import sink_traces

MARK = "# hf-memsinks pre-push hook"
CHAINED = "pre-push.hf-memsinks-chained"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"
HOOK = """#!/bin/sh
{mark} (hf-memsinks install-hook): refuses a push that would publish the sinks'
# memorized training data. The pre-push hook that was here before, if any, is {chained} and runs after.
input=$(cat)
feed() {{ [ -z "$input" ] || printf '%s\\n' "$input"; }}
feed | {python} -m hf_memsinks.cli audit --git-push "$1" . || exit 1
chained="$(dirname "$0")/{chained}"
if [ -x "$chained" ]; then feed | "$chained" "$@" || exit $?; fi
exit 0
"""


def _git(repo: str, *args: str, data: bytes | None = None) -> bytes:
    proc = subprocess.run(["git", "-C", repo, *args], input=data, capture_output=True)
    if proc.returncode:
        raise ValueError(f"git {' '.join(args)} in {repo}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def install_hook(repo: str = ".") -> str:
    """Write the pre-push hook into the git repository ``repo`` (its hooks directory, as git finds
    it: ``core.hooksPath`` is honoured); returns its path. A foreign pre-push hook is moved to
    ``pre-push.hf-memsinks-chained`` and still runs; installing again only rewrites this one."""
    hooks = os.path.join(repo, _git(repo, "rev-parse", "--git-path", "hooks").decode().strip())  # absolute stays
    os.makedirs(hooks, exist_ok=True)
    hook = os.path.join(hooks, "pre-push")
    if os.path.exists(hook):
        with open(hook, encoding="utf-8", errors="replace") as f:
            ours = MARK in f.read()
        if not ours:
            chained = os.path.join(hooks, CHAINED)
            if os.path.exists(chained):
                raise ValueError(f"install-hook: {hook} and {chained} both exist; merge them by hand first")
            os.replace(hook, chained)
    with open(hook, "w", encoding="utf-8") as f:
        f.write(HOOK.format(mark=MARK, chained=CHAINED, python=shlex.quote(sys.executable)))
    os.chmod(hook, 0o755)
    return hook


def pushed_traces(repo: str, lines: Iterable[str], remote: str | None = None) -> list[str]:
    """What the push described by ``lines`` (git's pre-push input: ``<local ref> <local oid> <remote
    ref> <remote oid>``) would publish of the sinks, as :func:`.upload_gate.sink_traces` says it."""
    traces = []
    for path, source in _pushed_files(repo, lines, remote):
        traces += sink_traces([(path, source)])
    return traces


def _pushed_files(repo: str, lines: Iterable[str], remote: str | None) -> Iterator[tuple[str, object]]:
    """(path, content) of every blob the push sends: bytes or a spooled file, an LFS object by path."""
    tips, known = [], []
    for line in lines:
        parts = line.split()
        if len(parts) != 4 or set(parts[1]) == {"0"}:
            continue  # not a ref line, or a deletion
        tips.append(parts[1])
        if set(parts[3]) != {"0"} and subprocess.run(["git", "-C", repo, "cat-file", "-e", parts[3]],
                                                      capture_output=True).returncode == 0:
            known.append(parts[3])
    if not tips:
        return
    listed = _git(repo, "rev-list", "--objects", *tips, "--not", *known, *([f"--remotes={remote}"] if remote else []))
    paths = {}
    for entry in listed.decode(errors="surrogateescape").splitlines():
        oid, _, path = entry.partition(" ")
        if path:
            paths.setdefault(oid, path)
    if not paths:
        return
    kinds = _git(repo, "cat-file", "--batch-check", data="".join(f"{oid}\n" for oid in paths).encode()).decode()
    blobs = [line.split()[0] for line in kinds.splitlines() if line.split()[1:2] == ["blob"]]
    lfs = os.path.join(repo, _git(repo, "rev-parse", "--git-common-dir").decode().strip(), "lfs", "objects")
    with subprocess.Popen(["git", "-C", repo, "cat-file", "--batch"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        for oid in blobs:
            proc.stdin.write(f"{oid}\n".encode())
            proc.stdin.flush()
            size = int(proc.stdout.readline().split()[2])
            with tempfile.SpooledTemporaryFile(max_size=8 << 20) as content:
                left = size
                while left:
                    chunk = proc.stdout.read(min(left, 1 << 20))
                    content.write(chunk)
                    left -= len(chunk)
                proc.stdout.read(1)  # the newline after each object
                content.seek(0)
                head = content.read(len(LFS_POINTER))
                content.seek(0)
                if head == LFS_POINTER:
                    yield _lfs_object(paths[oid], content.read().decode(errors="replace"), lfs)
                else:
                    yield paths[oid], content
        proc.stdin.close()


def _lfs_object(path: str, pointer: str, objects: str) -> tuple[str, object]:
    """The local Git LFS object a pointer names; missing, it is reported unreadable (refused)."""
    fields = dict(line.split(" ", 1) for line in pointer.splitlines() if " " in line)
    oid = fields.get("oid", "").removeprefix("sha256:")
    local = os.path.join(objects, oid[:2], oid[2:4], oid)
    if len(oid) == 64 and os.path.isfile(local):
        return path, local
    return path, _Missing(f"its Git LFS object {oid[:12]} is not in this clone (git lfs fetch)")


class _Missing:
    """A file object that cannot be read, so that the gate reports it as unreadable (refused)."""

    def __init__(self, why: str):
        self.why = why

    def tell(self) -> int:
        return 0

    def seek(self, *args) -> int:
        return 0

    def read(self, *args) -> bytes:
        raise OSError(self.why)
