"""What a file holds, whatever its name: safetensors tables, the key names in torch checkpoints and
pickles, and the members of archives (tar, zip, gzip, bz2, xz).

The upload gate (:mod:`.upload_gate`), the git pre-push hook (:mod:`.git_hook`) and the audit
(:mod:`.audit`) decide from this, so
that a sink checkpoint renamed ``weights.st`` or packed in ``ckpt.tar.gz`` is still seen. Nothing is
unpickled (a pickle is read opcode by opcode with :mod:`pickletools`) and nothing is decompressed
into memory whole: archives are streamed member by member, a safetensors file is read up to the end
of its header. Only a zip inside a stream (a torch checkpoint in a tar) is copied aside, to disk
past a few MB, because a zip is read from its end.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import json
import lzma
import os
import pickletools
import posixpath
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from ..checkpoints.format import SINK_KEY_MARKERS

MAX_DEPTH = 8  # layers of archives and compression (a .tar.gz is 2); deeper is refused as unreadable
MAX_HEADER = 100_000_000  # the safetensors format's own bound on its header
PICKLES = 5  # a legacy torch.save file is 5 pickles (magic, protocol, sys info, object, storage keys), then raw data
BIG_READ = 64 << 20  # pickled data past this size is skipped, not read into memory
SPOOL = 16 << 20
SINK_NAMES = frozenset(marker.lstrip(".") for marker in SINK_KEY_MARKERS)  # a pickled module's own parameter names
_ERRORS = (OSError, EOFError, ValueError, RuntimeError, struct.error, tarfile.TarError, zipfile.BadZipFile,
           lzma.LZMAError, zlib.error)


@dataclass(frozen=True)
class Finding:
    """One thing in a file: ``kind`` is ``"memsink"`` (a memsink file by its name), ``"tensors"``
    (a safetensors table, ``detail``), ``"keys"`` (sink names in a pickle, ``detail``) or
    ``"unreadable"`` (``detail`` says why: it could not be checked). ``where`` is the file, then
    ``:member`` for each archive it is in."""

    where: str
    kind: str
    detail: Any = None


def inspect(name: str, source: Any) -> tuple[Finding, ...]:
    """The findings of one file to upload: ``name`` is its path in the repository, ``source`` a local
    path, bytes or a binary file object (read from where it is, and put back there). A local file
    is read once however many upload steps ask (the answer is kept while its size and mtime stay)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            st = os.stat(path)
        except OSError as err:
            return (Finding(name, "unreadable", f"file: {err}"),)
        return _inspect_path(name, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io

        return tuple(_findings(name, io.BytesIO(source), 0, seekable=True))
    position = source.tell()
    try:
        return tuple(_findings(name, source, 0, seekable=True))
    finally:
        source.seek(position)


@functools.lru_cache(maxsize=1024)
def _inspect_path(name: str, path: str, *stat: int) -> tuple[Finding, ...]:
    try:
        with open(path, "rb") as f:
            return tuple(_findings(name, f, 0, seekable=True))
    except OSError as err:
        return (Finding(name, "unreadable", f"file: {err}"),)


def _findings(name: str, stream: BinaryIO, depth: int, seekable: bool) -> Iterator[Finding]:
    base = posixpath.basename(name.replace(os.sep, "/")).lower()
    if "memsink" in base:
        yield Finding(name, "memsink")
    yield from _content(name, stream, depth, seekable, says_safetensors=base.endswith(".safetensors"))


def _content(name, stream, depth, seekable, says_safetensors=False) -> Iterator[Finding]:
    kind = None
    try:
        stream, head = _head(stream, seekable)
        kind = _kind(head)
        if kind is None:
            if says_safetensors and head:
                yield Finding(name, "unreadable", "safetensors: no safetensors header")
            return
        if depth >= MAX_DEPTH and kind not in ("safetensors", "pickle"):
            yield Finding(name, "unreadable", f"{kind}: more than {MAX_DEPTH} layers of archives")
            return
        yield from _READERS[kind](name, stream, depth, seekable)
    except _ERRORS as err:
        yield Finding(name, "unreadable", f"{kind or 'file'}: {type(err).__name__}: {err}")


def _head(stream, seekable: bool) -> tuple[BinaryIO, bytes]:
    """The first 512 bytes, and a stream that still starts at them."""
    if seekable:
        position = stream.tell()
        head = stream.read(512)
        stream.seek(position)
        return stream, head
    prefixed = _Prefixed(stream, stream.read(512))
    return prefixed, prefixed.prefix


def _kind(head: bytes) -> str | None:
    if len(head) > 9 and head[8:9] == b"{" and 1 < struct.unpack("<Q", head[:8])[0] <= MAX_HEADER:
        return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def _safetensors(name, stream, depth, seekable) -> Iterator[Finding]:
    length = struct.unpack("<Q", stream.read(8))[0]
    header = stream.read(length)
    if len(header) != length:
        raise ValueError(f"header of {length} bytes cut at {len(header)}")
    table = json.loads(header)
    if not isinstance(table, dict):
        raise ValueError("header is not a table")
    yield Finding(name, "tensors", table)


def _pickle(name, stream, depth, seekable) -> Iterator[Finding]:
    """Sink names among the strings of up to :data:`PICKLES` consecutive pickles (read, not loaded)."""
    found: list[str] = []
    reader = _Skipping(stream)
    for i in range(PICKLES):
        try:
            for _, arg, _ in pickletools.genops(reader):
                if isinstance(arg, str) and _is_sink_name(arg) and arg not in found:
                    found.append(arg)
        except (ValueError, OverflowError, struct.error):
            if i == 0 and not found:
                return  # not a pickle after all
            break  # the raw data after a legacy torch file's pickles
    if found:
        yield Finding(name, "keys", tuple(found))


def _is_sink_name(text: str) -> bool:
    """A sink tensor's key, a pickled module's sink parameter, or a class of hf_memsinks (a pickled
    patched model or MemSinkConfig; ``GLOBAL`` names read ``"hf_memsinks.config MemSinkConfig"``)."""
    return text.endswith(SINK_KEY_MARKERS) or text in SINK_NAMES or text.split(".")[0] == "hf_memsinks"


def _zip(name, stream, depth, seekable) -> Iterator[Finding]:
    with _seekable_copy(stream, seekable) as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            where = f"{name}:{info.filename}"
            try:
                member = archive.open(info)
            except _ERRORS as err:  # an encrypted member
                yield Finding(where, "unreadable", f"zip member: {err}")
                continue
            with member:
                yield from _findings(where, member, depth + 1, seekable=True)


def _tar(name, stream, depth, seekable) -> Iterator[Finding]:
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for info in archive:
            if info.isfile():
                member = archive.extractfile(info)
                yield from _findings(f"{name}:{info.name}", member, depth + 1, seekable=False)


def _decompressed(opener):
    def read(name, stream, depth, seekable) -> Iterator[Finding]:
        with opener(stream) as inner:
            yield from _content(name, inner, depth + 1, seekable=False)
    return read


_READERS = {"safetensors": _safetensors, "pickle": _pickle, "zip": _zip, "tar": _tar,
            "gzip": _decompressed(lambda s: gzip.GzipFile(fileobj=s, mode="rb")),
            "bz2": _decompressed(bz2.BZ2File), "xz": _decompressed(lzma.LZMAFile)}


class _seekable_copy:
    """``stream`` itself when it can seek, else a spooled copy of the rest of it."""

    def __init__(self, stream, seekable: bool):
        self.stream, self.seekable, self.copy = stream, seekable, None

    def __enter__(self):
        if self.seekable:
            return self.stream
        self.copy = tempfile.SpooledTemporaryFile(max_size=SPOOL)
        shutil.copyfileobj(self.stream, self.copy, 1 << 20)
        self.copy.seek(0)
        return self.copy

    def __exit__(self, *exc):
        if self.copy is not None:
            self.copy.close()


class _Prefixed:
    """A forward-only stream whose first bytes were already read (``prefix``)."""

    def __init__(self, stream, prefix: bytes):
        self.stream, self.prefix, self.offset = stream, prefix, 0

    def read(self, n: int = -1) -> bytes:
        if self.offset < len(self.prefix):
            end = len(self.prefix) if n is None or n < 0 else min(len(self.prefix), self.offset + n)
            out = self.prefix[self.offset:end]
            self.offset = end
            if n is None or n < 0:
                return out + self.stream.read()
            if len(out) < n:
                out += self.stream.read(n - len(out))
            return out
        return self.stream.read(n)

    def readable(self) -> bool:
        return True


class _Gap(bytes):
    """Stands for ``n`` bytes of pickled data that were skipped, not read into memory: pickletools
    only checks their length (a string this long would be no tensor name)."""

    def __new__(cls, n: int):
        gap = super().__new__(cls)
        gap.n = n
        return gap

    def __len__(self) -> int:
        return self.n


class _Skipping:
    """The reader pickletools walks: reads longer than :data:`BIG_READ` are skipped as a :class:`_Gap`."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n <= BIG_READ:
            return self.stream.read(n)
        left = n
        while left:
            chunk = self.stream.read(min(left, 1 << 20))
            if not chunk:
                return b""  # cut short: pickletools reports it
            left -= len(chunk)
        return _Gap(n)

    def readline(self) -> bytes:
        out = bytearray()
        while len(out) < BIG_READ:
            c = self.stream.read(1)
            out += c
            if c in (b"\n", b""):
                break
        return bytes(out)
