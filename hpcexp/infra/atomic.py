"""Crash-consistent file publication.

Everything hpcexp publishes (recipes, reports, run records, image sidecars, archives)
is written to a temporary name in the destination's own directory, fsynced, renamed over
the final name with ``os.replace`` and the directory fsynced (Pillai et al., OSDI'14). A
reader therefore sees the old version or the new one, never a mix, and a crash leaves at
worst a temporary file whose name says who made it, which ``hpcexp clean`` can judge.

Temporary names follow ``.hpcexp-tmp-<host>-<pid>-<rand>-<final name>`` so that the
owner of an orphan can be identified (reliability invariant I6/I11).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator

from hpcexp.errors import PermissionProblem, StorageError
from hpcexp.infra import host as hostinfo

TMP_PREFIX = ".hpcexp-tmp-"


def tmp_name_for(final: Path) -> Path:
    """A unique temporary sibling of ``final`` that names its owner (host and pid)."""
    host = hostinfo.short_hostname()
    return final.with_name(f"{TMP_PREFIX}{host}-{os.getpid()}-{os.urandom(4).hex()}-{final.name}")


def parse_tmp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary file made by :func:`tmp_name_for`, or None."""
    if not name.startswith(TMP_PREFIX):
        return None
    rest = name[len(TMP_PREFIX):]
    parts = rest.split("-")
    # host may itself contain '-': pid is the first all-digit field followed by an 8-hex token
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and len(parts[i + 1]) == 8:
            return "-".join(parts[:i]), int(parts[i])
    return None


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable; ignored where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def storage_error(exc: OSError, path: Path | str) -> Exception:
    """Translate an OSError into the hpcexp error a user can act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left writing {path} ({exc.strerror})",
                            hint="free space or point `images:`/`runs:` in hpcexp.yaml elsewhere")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionProblem(f"cannot write {path}: {exc.strerror}")
    return StorageError(f"cannot write {path}: {exc.strerror or exc}")


def access_error(exc: OSError, path: Path | str) -> Exception:
    """Translate an OSError of unknown direction (read or write) without guessing which."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return storage_error(exc, path)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionProblem(f"cannot access {path}: {exc.strerror}")
    return StorageError(f"cannot access {path}: {exc.strerror or exc}")


def read_error(exc: OSError, path: Path | str) -> Exception:
    """Translate an OSError raised while READING ``path`` (never says "write")."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionProblem(f"cannot read {path}: {exc.strerror}")
    return StorageError(f"cannot read {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike[str], mode: str = "wb", *, perms: int | None = None) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``final``; on clean exit fsync and rename it into place.

    On any exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    tmp = tmp_name_for(final)
    fh: IO[Any] | None = None
    try:
        # open() inside the try: a signal turned into an exception (SIGTERM, Ctrl-C) right
        # after the file was created must still close and remove it
        fh = open(tmp, mode)  # noqa: SIM115 - closed below
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if perms is not None:
            os.chmod(tmp, perms)
        os.replace(tmp, final)
    except BaseException as exc:
        if fh is not None:
            with contextlib.suppress(OSError, ValueError):
                fh.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage_error(exc, final) from exc
        raise
    fsync_dir(final.parent)


def write_bytes(final: str | os.PathLike[str], data: bytes, *, perms: int | None = None) -> None:
    """Atomically replace ``final`` with ``data``."""
    with atomic_open(final, "wb", perms=perms) as fh:
        fh.write(data)


def write_text(final: str | os.PathLike[str], text: str, *, perms: int | None = None) -> None:
    """Atomically replace ``final`` with UTF-8 ``text``."""
    write_bytes(final, text.encode("utf-8"), perms=perms)


def ensure_dir(path: Path) -> None:
    """``mkdir -p``, with the StorageError that names the folder (full disk, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, path) from exc


def write_text_nosync(final: Path, text: str) -> None:
    """Replace ``final`` by temp name and rename WITHOUT fsync: every reader sees the old or
    the new text whole, but a machine crash may bring back the old one. For what is kept
    durably elsewhere (a sweep task's record) or is only a cache."""
    tmp = tmp_name_for(final)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, final)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise storage_error(exc, final) from exc


def write_json(final: str | os.PathLike[str], obj: Any) -> None:
    """Atomically replace ``final`` with ``obj`` as indented, key-sorted JSON."""
    write_text(final, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
