"""Locks that record their owner and are broken only when the owner is provably dead.

Used around image builds so that two shells (or two users sharing an images folder on
NFS) building the same image run Apptainer once: the second waits and reuses the result.

How the lock is taken: the owner record (host, pid, the pid's start time, boot_id, user,
start time) is written to a uniquely named file beside the lock, then ``link()``-ed to the
lock's name. ``link`` is atomic on local file systems and on NFS (where ``O_EXCL`` has
historically not been), and a link count of 2 confirms success even when an NFS reply
was lost (the flufl.lock technique). Kernel locks (flock/fcntl) are not used: on NFS they
may be local-only or missing, and they tell nothing about who holds them.

When is a lock stale? Only when its owner ran on THIS host in THIS boot (same boot_id)
and its pid is gone, or now belongs to a different process (start time differs). A lock
held from another host is never judged by age: the waiter says who holds it and how to
remove it by hand if that host is known to be down (reliability rule R5).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from hpcexp.errors import LockBusy
from hpcexp.infra import atomic
from hpcexp.infra import host as hostinfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    """Who holds a lock."""

    host: str
    pid: int
    user: str
    started: str
    boot_id: str | None = None
    pid_start: int | None = None
    purpose: str = ""

    @classmethod
    def me(cls, purpose: str = "") -> "Owner":
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        return cls(host=hostinfo.hostname(), pid=os.getpid(), user=hostinfo.user(), started=now,
                   boot_id=hostinfo.boot_id(), pid_start=hostinfo.pid_start_ticks(os.getpid()), purpose=purpose)

    @classmethod
    def from_json(cls, text: str) -> "Owner | None":
        try:
            data = json.loads(text)
            return cls(host=str(data["host"]), pid=int(data["pid"]), user=str(data.get("user", "?")),
                       started=str(data.get("started", "?")), boot_id=data.get("boot_id"),
                       pid_start=data.get("pid_start"), purpose=str(data.get("purpose", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return f"{self.user}@{self.host} pid {self.pid} since {self.started}"

    def is_dead(self) -> bool:
        """True only when provably dead: same host, same boot, and the pid is gone or reused."""
        if self.host != hostinfo.hostname():
            return False
        mine = hostinfo.boot_id()
        if self.boot_id is None or mine is None:
            return False
        if self.boot_id != mine:
            # Same host, another boot: every process of that boot is gone.
            return True
        return not hostinfo.pid_alive(self.pid, self.pid_start)


def read_owner(path: Path) -> Owner | None:
    """The owner recorded in lock file ``path`` (None if absent or unreadable)."""
    try:
        return Owner.from_json(path.read_text(encoding="utf-8"))
    except OSError:
        return None


class Lock:
    """An owner-recording lock file. Use :meth:`hold` as a context manager."""

    def __init__(self, path: Path, purpose: str = "") -> None:
        self.path = Path(path)
        self.purpose = purpose
        self.owner: Owner | None = None

    def try_acquire(self) -> Owner | None:
        """Take the lock if free (breaking it if its owner is provably dead).

        Returns None on success, else the current holder.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise atomic.storage_error(exc, self.path.parent) from exc
        me = Owner.me(self.purpose)
        for _ in range(5):
            tmp = atomic.tmp_name_for(self.path)
            try:
                with open(tmp, "x", encoding="utf-8") as fh:
                    fh.write(me.to_json())
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, self.path)
                    linked = True
                except FileExistsError:
                    linked = False
                except OSError as exc:
                    # NFS can lose the reply of a successful link: trust the link count.
                    linked = os.stat(tmp).st_nlink == 2
                    if not linked and exc.errno not in (errno.EEXIST,):
                        raise atomic.storage_error(exc, self.path) from exc
            except OSError as exc:
                raise atomic.storage_error(exc, self.path) from exc
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if linked:
                self.owner = me
                atomic.fsync_dir(self.path.parent)
                return None
            holder_text = self._read_text()
            if holder_text is None:
                continue  # released meanwhile: try again
            holder = Owner.from_json(holder_text)
            if holder is not None and holder.is_dead():
                self._break(holder_text, holder)
                continue
            if holder is None:
                # Being written (we read it between create and write), or garbage: never break.
                holder = Owner(host="?", pid=0, user="?", started="?")
            return holder
        return read_owner(self.path) or Owner(host="?", pid=0, user="?", started="?")

    def _read_text(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise atomic.read_error(exc, self.path) from exc

    def _break(self, text: str, holder: Owner) -> None:
        """Remove a dead owner's lock without ever removing a live one taken meanwhile."""
        aside = atomic.tmp_name_for(self.path.with_name(self.path.name + ".broken"))
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = aside.read_text(encoding="utf-8")
        except OSError:
            moved = None
        if moved != text:
            # Someone broke and re-took it between our read and our rename: put theirs back.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            log.warning("removed stale lock %s of %s (process gone)", self.path, holder.describe())
        with contextlib.suppress(OSError):
            os.unlink(aside)

    def acquire(self, *, wait: bool = True, on_wait: Callable[[Owner], None] | None = None,
                poll: float = 0.2, what: str | None = None) -> None:
        """Take the lock, waiting for the holder unless ``wait`` is False (then LockBusy, exit 75)."""
        told: tuple[str, int] | None = None
        delay = poll
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            if not wait:
                raise LockBusy(f"{what or self.path} is being built by {holder.describe()}",
                               hint=f"wait, or if that process is gone for good remove {self.path}")
            key = (holder.host, holder.pid)
            if on_wait is not None and told != key:
                on_wait(holder)
                told = key
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.owner is None:
            return
        text = self._read_text()
        if text is not None and Owner.from_json(text) == self.owner:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.owner = None

    @contextlib.contextmanager
    def hold(self, **kwargs: object) -> Iterator["Lock"]:
        self.acquire(**kwargs)  # type: ignore[arg-type]
        try:
            yield self
        finally:
            self.release()


def break_lock(path: Path, *, force: bool = False) -> Owner | None:
    """Remove the lock at ``path`` if its owner is provably dead, or at once with ``force``.

    Returns the owner it belonged to (a placeholder when its record is unreadable and
    ``force`` is given), or None when nothing was broken: no such lock, or its owner may
    be alive. A lock re-taken by someone else meanwhile is never removed (see Lock._break).
    """
    lock = Lock(Path(path))
    text = lock._read_text()
    if text is None:
        return None
    owner = Owner.from_json(text)
    if owner is None:
        if not force:
            return None
        owner = Owner(host="?", pid=0, user="?", started="?", purpose="(unreadable owner record)")
    elif not force and not owner.is_dead():
        return None
    lock._break(text, owner)
    return None if lock._read_text() == text else owner
