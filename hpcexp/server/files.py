"""Opening files of a run for download, without ever leaving the run's folder.

A request names a file by a relative path under a root (the run's ``results/`` folder,
or the run folder itself for its logs). Refused, each as :class:`Refused` (HTTP 400 or
404, never a file): empty, ``.`` or ``..`` components, absolute paths, backslashes, NUL
and control characters; a symlink whose target resolves outside the root; FIFOs,
sockets and devices (opened with ``O_NONBLOCK`` and checked with ``fstat`` before any
read). The resolved path is then opened one component at a time with ``O_NOFOLLOW``
from the root's own descriptor, so a link swapped in between the check and the open is
refused too.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class Refused(Exception):
    """A path that may not be served; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def split_rel(rel: str) -> list[str]:
    """The components of a request path, or Refused."""
    if rel == "":
        return []
    if rel.startswith("/") or "\\" in rel:
        raise Refused("absolute paths and backslashes are not allowed", 400)
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise Refused("'..', '.' and empty path components are not allowed", 400)
        if any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise Refused("control characters are not allowed in paths", 400)
    return parts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def real_root(root: str) -> str:
    """The root folder itself must be a real folder (not a link): its resolved path."""
    try:
        st = os.lstat(root)
    except OSError:
        raise Refused("no such folder") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused("not a folder")
    return os.path.realpath(root)


def resolve_inside(root: str, rel: str) -> list[str]:
    """Components, relative to the real root, of what ``rel`` names (links followed, staying inside)."""
    parts = split_rel(rel)
    base = real_root(root)
    target = os.path.realpath(os.path.join(base, *parts)) if parts else base
    if not _inside(target, base):
        raise Refused("the path leads outside the run's folder", 403)
    rest = os.path.relpath(target, base)
    return [] if rest == "." else rest.split("/")


def _open_dir_fd(base: str, parts: list[str]) -> int:
    fd = os.open(base, os.O_RDONLY | DIRECTORY | CLOEXEC | NOFOLLOW)
    try:
        for part in parts:
            nxt = os.open(part, os.O_RDONLY | DIRECTORY | CLOEXEC | NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError:
        os.close(fd)
        raise Refused("no such folder") from None
    return fd


@dataclass
class Opened:
    fd: int
    size: int
    name: str
    mtime: float


def open_file(root: str, rel: str) -> Opened:
    """Open the regular file ``rel`` under ``root`` for reading; the caller closes ``fd``."""
    parts = resolve_inside(root, rel)
    if not parts:
        raise Refused("not a file")
    base = real_root(root)
    dir_fd = _open_dir_fd(base, parts[:-1])
    try:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK | CLOEXEC, dir_fd=dir_fd)
        except OSError:
            raise Refused("no such file") from None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused("not a regular file (folders, FIFOs, sockets and devices are never served)", 403)
    return Opened(fd=fd, size=st.st_size, name=parts[-1], mtime=st.st_mtime)


@dataclass
class Entry:
    name: str
    rel: str
    kind: str          # dir | file | symlink | special
    size: int | None
    target: str | None = None
    inside: bool = False   # a symlink resolving inside the root (then it can be opened)


def list_dir(root: str, rel: str) -> list[Entry]:
    """Entries of the folder ``rel`` under ``root`` (never following a link out)."""
    parts = resolve_inside(root, rel)
    base = real_root(root)
    fd = _open_dir_fd(base, parts)
    out: list[Entry] = []
    try:
        for name in sorted(os.listdir(fd)):
            child_rel = "/".join([*parts, name])
            try:
                st = os.lstat(name, dir_fd=fd)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append(Entry(name, child_rel, "dir", None))
            elif stat.S_ISREG(st.st_mode):
                out.append(Entry(name, child_rel, "file", st.st_size))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=fd)
                resolved = os.path.realpath(os.path.join(base, child_rel))
                out.append(Entry(name, child_rel, "symlink", None, target=target, inside=_inside(resolved, base)))
            else:
                out.append(Entry(name, child_rel, "special", None))
    finally:
        os.close(fd)
    return out


def read_chunks(fd: int, size: int | None = None, chunk: int = 256 * 1024):  # noqa: ANN201 - a generator
    """Read ``fd`` from 0 in chunks (up to ``size`` bytes when given), closing it at the end."""
    try:
        pos = 0
        while size is None or pos < size:
            n = chunk if size is None else min(chunk, size - pos)
            data = os.pread(fd, n, pos)
            if not data:
                break
            pos += len(data)
            yield data
    finally:
        os.close(fd)
