"""This host and its processes: who we are, which boot this is, whether a process lives.

The one owner of these facts. Locks, run records, temporary names and the doctor all ask
here, so that "who owns this" and "is that process still alive" have one answer.

Why a pid is never enough: pids are reused, and after a reboot every pid of the previous
boot is meaningless. A process is identified by (host, boot id, pid, start time in clock
ticks since boot), and judged dead only when that identity provably no longer runs.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

# defined beside the watchdog, which must start without this module's imports; found here
from hpcexp.infra.watchdog import pids_with_marker as pids_with_marker

#: A subordinate id range this large maps every id a Debian or RHEL base image uses
#: (Apptainer's documentation and `useradd` both use 65536). Doctor and build share it.
FULL_SUBID_RANGE = 65536

SUBUID_FILE = Path("/etc/subuid")
SUBGID_FILE = Path("/etc/subgid")


def user() -> str:
    """The user name, or the uid as text where the passwd database has no entry (containers)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises several types when there is no passwd entry
        return str(os.getuid())


def hostname() -> str:
    return os.uname().nodename  # what socket.gethostname() returns, without importing socket


def short_hostname() -> str:
    """The host name up to its first dot (what temporary names carry)."""
    return hostname().split(".")[0] or "host"


def boot_id() -> str | None:
    """This boot's id: a pid is only meaningful together with it (pids are reused after reboot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat).

    None when the process does not exist or is a zombie (it has exited, only its parent
    has not reaped it yet).
    """
    try:
        raw = Path(f"/proc/{int(pid)}/stat").read_bytes()
    except (OSError, ValueError):
        return None
    rest = raw[raw.rfind(b")") + 2:].split()
    if not rest or rest[0] in (b"Z", b"X"):
        return None
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """Whether ``pid`` runs on this host and, if ``start`` is given, is the same process.

    Errs on the side of "alive" where it cannot see: shared login nodes often mount /proc
    with ``hidepid=2``, so another user's process has no visible /proc entry; then only
    ``kill(pid, 0)`` answers (EPERM: it exists), and its start time cannot be compared.
    A lock or a run is never judged dead on such evidence.
    """
    if not pid or int(pid) <= 0:
        return False
    pid = int(pid)
    ticks = pid_start_ticks(pid)
    if ticks is not None:
        return start is None or int(start) == ticks
    if os.path.exists(f"/proc/{pid}"):
        return False  # visible, and a zombie: it has exited
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else, hidden from /proc
    return not os.path.exists("/proc/self/stat")  # no /proc at all (not Linux): the pid is all we have


@dataclass(frozen=True)
class SubidRanges:
    """The user's subordinate uid and gid ranges as (start, count), None where absent."""

    user: str
    uids: tuple[int, int] | None
    gids: tuple[int, int] | None

    @property
    def full(self) -> bool:
        """Enough for a full ``--fakeroot`` id mapping (both ranges, each FULL_SUBID_RANGE ids)."""
        return all(r is not None and r[1] >= FULL_SUBID_RANGE for r in (self.uids, self.gids))

    @property
    def any(self) -> bool:
        return self.uids is not None or self.gids is not None


def _subid_range(name: str, uid: int, path: Path) -> tuple[int, int] | None:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(uid)):
            try:
                start, count = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if count > 0:
                return start, count
    return None


def subid_ranges(name: str | None = None, uid: int | None = None, *, subuid: Path | None = None,
                 subgid: Path | None = None) -> SubidRanges:
    """The subordinate id ranges of ``name`` (default: this user) from /etc/subuid and /etc/subgid.

    ``HPCEXP_SUBUID_FILE`` / ``HPCEXP_SUBGID_FILE`` point elsewhere (tests, unusual sites).
    Sites that serve subids from another source than these files are rare; a wrong "no"
    only costs a warning, because Apptainer itself decides at build time.
    """
    name = user() if name is None else name
    uid = os.getuid() if uid is None else uid
    subuid = subuid or Path(os.environ.get("HPCEXP_SUBUID_FILE") or SUBUID_FILE)
    subgid = subgid or Path(os.environ.get("HPCEXP_SUBGID_FILE") or SUBGID_FILE)
    return SubidRanges(name, _subid_range(name, uid, subuid), _subid_range(name, uid, subgid))
