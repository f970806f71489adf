"""The watchdog's own program, and the two things it needs: finding a run's processes by
their marker, and killing a process group with them.

Every local run and every build starts one watchdog (see :class:`hpcexp.infra.process.Watchdog`),
so its start-up is paid each time: this module imports the standard library's ``os``,
``signal`` and ``time`` only (about 10 ms of CPU with ``python -I -S``, against 40 ms when
it came through the process seam's imports).
"""

from __future__ import annotations

import os
import signal
import time

TYPE_CHECKING = False  # typing itself costs the watchdog's start-up more than it saves
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable, Sequence


def pids_with_marker(value: str, *, key_suffix: str = "HPCEXP_RUN_ID", exclude: Iterable[int] = ()) -> list[int]:
    """This user's processes whose environment holds ``...HPCEXP_RUN_ID=value``.

    Apptainer passes ``APPTAINERENV_HPCEXP_RUN_ID`` to its helpers and the payload sees
    ``HPCEXP_RUN_ID``, so this finds every process of a run, including those that left
    its process group. hpcexp's own supervisor and watchdog never carry the marker.
    """
    want = value.encode()
    suffix = key_suffix.encode()
    skip = {os.getpid(), *exclude}
    uid = os.getuid()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        for item in env.split(b"\0"):
            key, _, val = item.partition(b"=")
            if val == want and key.endswith(suffix):
                found.append(int(name))
                break
    return found


def kill_group(pgid: int | None, *, marker: str | None = None, grace: float = 2.0,
               exclude: Iterable[int] = ()) -> int:
    """SIGTERM process group ``pgid`` and the processes marked with ``marker``; SIGKILL what is
    left after ``grace`` seconds. Returns how many processes had to be signalled.

    The marker (a run id, see :func:`hpcexp.infra.host.pids_with_marker`) finds the
    processes that left the group (daemonised helpers, a payload whose parent died).
    """
    exclude = set(exclude)

    def marked() -> set[int]:
        return set(pids_with_marker(marker, exclude=exclude)) if marker else set()

    touched = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        victims = marked()
        group_alive = False
        if pgid:
            try:
                os.killpg(pgid, sig)
                group_alive = True
            except (ProcessLookupError, PermissionError):
                pass
        for pid in victims:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        touched = max(touched, len(victims) + (1 if group_alive else 0))
        if sig == signal.SIGKILL or not touched:  # nothing was there: nothing to wait for
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            group_alive = False
            if pgid:
                try:
                    os.killpg(pgid, 0)
                    group_alive = True
                except (ProcessLookupError, PermissionError):
                    pass
            if not group_alive and not marked():
                return touched
            time.sleep(0.05)
    return touched


def owner_released() -> bool:  # pragma: no cover - runs in a watchdog or guard process
    """Block on stdin, the pipe from the owner, ignoring the signals a terminal or a job's
    end sends to the group: True when the owner wrote its release byte (it cleaned up
    itself), False at end of file without it (the owner died)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            return bool(os.read(0, 1))
        except InterruptedError:
            continue


def main(args: Sequence[str]) -> None:  # pragma: no cover - runs in the watchdog process
    """`PGID MARKER GRACE`: wait for the owner's byte on stdin; end of file without it kills the group."""
    pgid, marker, grace = int(args[0]), args[1] or None, float(args[2])
    if not owner_released():
        kill_group(pgid, marker=marker, grace=grace)
