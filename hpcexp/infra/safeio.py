"""Reading files that someone else may have damaged or planted.

Run records, recipes, reports, Dockerfiles and configs live in folders that other users
of a group-shared project can write. Everything hpcexp reads from there goes through
:func:`read_regular`, which never blocks on a FIFO or device, never follows a symlink
unless the link stays inside a given root, and never reads more than a cap; and JSON goes
through :func:`load_json`, which refuses nesting deep enough to exhaust the recursion
limit before the parser sees it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from hpcexp.errors import PermissionProblem, UsageError

MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class Unsafe(UsageError):
    """The file is not a plain, readable, reasonably small regular file inside its root."""

    def __init__(self, what: str, path: Path, why: str) -> None:
        super().__init__(f"{what} {path} {why}")
        self.why = why


class Unreadable(PermissionProblem):
    """Permission denied reading the file (exit 77)."""

    def __init__(self, what: str, path: Path, why: str) -> None:
        super().__init__(f"cannot read {what} {path}: {why}")
        self.why = f"cannot read it: {why}"


def owner_name(uid: int) -> str:
    """The user name of ``uid`` (the number when there is no passwd entry)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def is_inside(path: Path | str, root: Path | str) -> bool:
    """True when ``path`` (already resolved) is ``root`` or below it."""
    p, r = os.path.normpath(str(path)), os.path.normpath(str(root))
    return p == r or p.startswith(r.rstrip("/") + "/")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


#: how often a file replaced by a rename between the check and the open is looked at again
REPLACED_RETRIES = 5


class _Replaced(Exception):
    """The name now points at another regular file: a writer renamed a new version in."""


def read_regular(path: Path | str, *, max_bytes: int, what: str = "file", inside: Path | str | None = None) -> bytes:
    """The bytes of regular file ``path``, read without blocking and without following links out.

    ``inside``: a symlink is followed only when its target resolves below this folder;
    without it a symlink is refused. Special files (FIFO, device, socket, directory) are
    refused before they are opened. Raises :class:`Unsafe` (exit 2) naming the path and
    the reason, :class:`PermissionProblem` (77, "cannot read") or FileNotFoundError.

    A file that another regular file replaced between the check and the open (a record
    being rewritten by temp name and rename, as every writer here does) is read again,
    from the check; only a swap to something else, or one that keeps happening, is refused.
    """
    for _ in range(REPLACED_RETRIES):
        try:
            return _read_regular(Path(path), max_bytes=max_bytes, what=what, inside=inside)
        except _Replaced:
            continue
    raise Unsafe(what, Path(path), "changed while being opened; refusing it")


def _read_regular(path: Path, *, max_bytes: int, what: str, inside: Path | str | None) -> bytes:
    st = os.lstat(path)
    target = path
    if stat.S_ISLNK(st.st_mode):
        if inside is None:
            raise Unsafe(what, path, "is a symbolic link; refusing to follow it")
        real = os.path.realpath(path)
        if not is_inside(real, os.path.realpath(inside)):
            raise Unsafe(what, path, f"is a symbolic link leading outside {inside}; refusing to read it")
        target = Path(real)
        st = os.lstat(target)
    if not stat.S_ISREG(st.st_mode):
        raise Unsafe(what, path, f"is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise Unsafe(what, path, f"is {st.st_size} bytes, larger than the {max_bytes} allowed; refusing to read it")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise Unreadable(what, path, f"{exc.strerror} (owned by {owner_name(st.st_uid)})") from None
        if exc.errno == errno.ELOOP:
            raise Unsafe(what, path, "became a symbolic link while being opened; refusing it") from None
        raise
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise Unsafe(what, path, "changed while being opened; refusing it")
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise _Replaced()
        chunks: list[bytes] = []
        got = 0
        while True:
            data = os.read(fd, min(1 << 20, max_bytes + 1 - got))
            if not data:
                break
            chunks.append(data)
            got += len(data)
            if got > max_bytes:
                raise Unsafe(what, path, f"grew beyond the {max_bytes} bytes allowed while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects in JSON text (strings skipped), without recursion."""
    depth = best = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub(b'""', data)):
        if m.group() in (b"[", b"{"):
            depth += 1
            best = max(best, depth)
        else:
            depth -= 1
    return best


def load_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON bytes; ValueError (never RecursionError) for bad or too deeply nested text."""
    # Nesting cannot be deeper than the number of opening brackets: a run record has a
    # few dozen, so the string-stripping scan (most of reading a record) is skipped then.
    depth = 0 if data.count(b"[") + data.count(b"{") <= max_depth else json_depth(data)
    if depth > max_depth:
        raise ValueError(f"nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError("nested too deeply") from None


def load_json_file(path: Path | str, *, max_bytes: int = 1 << 20, what: str = "file") -> Any:
    """JSON from a small file others may have damaged; FileNotFoundError when it is absent,
    ValueError (saying why) for anything else: a special file, a symlink, too big, too deep."""
    try:
        raw = read_regular(path, max_bytes=max_bytes, what=what)
    except FileNotFoundError:
        raise
    except (UsageError, PermissionProblem) as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return load_json(raw)
