"""Reading archives: the format from the first bytes, and the members of a tar.gz or zip in order.

``verify`` and ``extract`` both read untrusted archives through this one iteration, which
turns any damage into :class:`Corrupt` naming the member being read.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from hpcexp.archive.base import CHUNK
from hpcexp.errors import NotFound, UsageError


def detect_format(path: Path) -> str:
    """``zip`` or ``tar.gz`` (or ``tar``) from the file's first bytes, not its name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except FileNotFoundError:
        raise NotFound(f"no archive at {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not an archive") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise UsageError(f"{path} is not a zip or tar.gz archive")


@dataclass
class Member:
    name: str                      # as stored, without a trailing "/" for folders
    kind: str                      # file | dir | symlink | hardlink | special
    size: int = 0
    target: str = ""
    mode: int = 0o644
    detail: str = ""               # for special: what it is
    open: Callable[[], IO[bytes]] | None = None
    packed: int | None = None      # zip: the member's compressed size (for the ratio check)


class Corrupt(Exception):
    def __init__(self, member: str, detail: str) -> None:
        super().__init__(detail)
        self.member, self.detail = member, detail


# What reading a damaged or odd archive raises (zipfile: RuntimeError for encrypted members,
# NotImplementedError for unknown compression; tarfile/gzip: their own errors, zlib.error).
READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError,
                                                 gzip.BadGzipFile, struct.error, ValueError,
                                                 NotImplementedError, RuntimeError)


def iter_members(path: Path, fmt: str) -> Iterator[Member]:
    """Members in archive order; raises Corrupt naming the member being read."""
    if fmt == "zip":
        yield from _iter_zip(path)
    else:
        yield from _iter_tar(path)


def _iter_tar(path: Path) -> Iterator[Member]:
    last = "(start of archive)"
    try:
        with tarfile.open(path, "r|*") as tf:
            while True:
                ti = tf.next()
                if ti is None:
                    break
                tf.members.clear()  # type: ignore[attr-defined]  # TarFile keeps every member read (~50 MiB/100k)
                last = ti.name
                name = ti.name.rstrip("/") if ti.isdir() else ti.name
                if ti.isreg():
                    m = Member(name, "file", ti.size, mode=ti.mode, open=functools.partial(_tar_open, tf, ti))
                elif ti.isdir():
                    m = Member(name, "dir", mode=ti.mode)
                elif ti.issym():
                    m = Member(name, "symlink", target=ti.linkname)
                elif ti.islnk():
                    m = Member(name, "hardlink", target=ti.linkname)
                else:
                    what = ("FIFO" if ti.isfifo() else "character device" if ti.ischr()
                            else "block device" if ti.isblk() else "special member")
                    m = Member(name, "special", detail=what)
                yield m
    except READ_ERRORS as exc:
        raise Corrupt(last, f"{type(exc).__name__}: {exc}") from None


def _tar_open(tf: tarfile.TarFile, ti: tarfile.TarInfo) -> IO[bytes]:
    fh = tf.extractfile(ti)
    if fh is None:  # pragma: no cover - only regular members get an opener
        raise tarfile.ReadError(f"{ti.name} has no data")
    return fh


def _iter_zip(path: Path) -> Iterator[Member]:
    last = "(central directory)"
    try:
        with zipfile.ZipFile(path) as zf:
            for zi in zf.infolist():
                last = zi.filename
                mode = (zi.external_attr >> 16) & 0xFFFF if zi.create_system == 3 else 0
                ftype = stat.S_IFMT(mode)
                name = zi.filename
                if zi.is_dir() or ftype == stat.S_IFDIR:
                    yield Member(name.rstrip("/"), "dir", mode=mode & 0o7777 or 0o755)
                elif ftype == stat.S_IFLNK:
                    if zi.file_size > 65536:
                        raise Corrupt(name, "symlink target longer than 64 KiB")
                    target = zf.read(zi).decode("utf-8", "surrogateescape")
                    yield Member(name, "symlink", target=target)
                elif ftype in (0, stat.S_IFREG):
                    yield Member(name, "file", zi.file_size, mode=mode & 0o7777 or 0o644,
                                  open=functools.partial(zf.open, zi), packed=zi.compress_size)
                else:
                    what = ("FIFO" if ftype == stat.S_IFIFO else "socket" if ftype == stat.S_IFSOCK
                            else "device" if ftype in (stat.S_IFCHR, stat.S_IFBLK) else "special member")
                    yield Member(name, "special", detail=what)
    except READ_ERRORS as exc:
        raise Corrupt(last, f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise Corrupt(last, f"{exc.strerror or exc}") from None


def hash_member(m: Member) -> tuple[int, str]:
    assert m.open is not None
    h = hashlib.sha256()
    size = 0
    with m.open() as fh:
        while True:
            data = fh.read(CHUNK)
            if not data:
                break
            h.update(data)
            size += len(data)
    return size, h.hexdigest()
