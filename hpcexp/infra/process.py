"""The one seam through which hpcexp runs child processes.

Every ``apptainer``, ``sbatch``, ``squeue``... call goes through :func:`run` (to
completion) or :func:`spawn` (a child to watch while it runs), with an argument list
(never a shell string, never ``shell=True``). Commands are logged at debug level, a
missing executable becomes :class:`~hpcexp.errors.EnvironmentProblem` with a fix, and
the result is a small dataclass rather than a dict, so callers decide what a non-zero
exit means. :class:`Watchdog` is the one way to make sure a child's process tree does
not outlive hpcexp.

Tests can substitute fakes by putting scripts on ``PATH``; nothing here caches the
location of an executable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hpcexp.errors import EnvironmentProblem
from hpcexp.infra.watchdog import kill_group as kill_group  # the seam's one way to end a process tree

log = logging.getLogger(__name__)

INSTALL_HINTS: dict[str, str] = {
    "apptainer": "install Apptainer >= 1.1 (https://apptainer.org/docs/admin/latest/installation.html) "
    "or load its module (`module load apptainer`); run `hpcexp doctor`",
    "sbatch": "Slurm's client commands are not on PATH; run on a login node or `module load slurm`",
    "squeue": "Slurm's client commands are not on PATH; run on a login node or `module load slurm`",
    "scancel": "Slurm's client commands are not on PATH; run on a login node or `module load slurm`",
    "sacct": "Slurm's client commands are not on PATH; run on a login node or `module load slurm`",
    "sinfo": "Slurm's client commands are not on PATH; run on a login node or `module load slurm`",
    "scontrol": "Slurm's client commands are not on PATH; run on a login node or `module load slurm`",
}


@dataclass(frozen=True)
class Result:
    """What a finished child process left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_line(self) -> str:
        """The last non-empty line of stderr (or stdout): usually the tool's own reason."""
        for stream in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in stream.splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        return f"exit code {self.returncode}"


def which(program: str, env: Mapping[str, str] | None = None) -> str | None:
    """Where ``program`` is on PATH (of ``env`` if given), or None."""
    return _which(program, (env or os.environ).get("PATH"))


def _which(program: str, path: str | None) -> str | None:
    """``shutil.which`` on POSIX, without importing shutil (and the compression modules it
    loads): a local run asks where apptainer and git are, and pays for every import."""
    def runnable(candidate: str) -> bool:
        return os.path.exists(candidate) and os.access(candidate, os.X_OK) and not os.path.isdir(candidate)

    if os.path.dirname(program):
        return program if runnable(program) else None
    if path is None:
        path = os.environ.get("PATH", None)
        if path is None:
            try:
                path = os.confstr("CS_PATH")
            except (AttributeError, ValueError):
                path = os.defpath
    if not path:
        return None
    seen: set[str] = set()
    for folder in path.split(os.pathsep):
        if folder in seen:
            continue
        seen.add(folder)
        candidate = os.path.join(folder, program)
        if runnable(candidate):
            return candidate
    return None


# Where distributions put the administrative tools Apptainer runs for a build (debootstrap,
# fuse2fs, ...): an ordinary user's PATH on Debian has no sbin folder. This is Apptainer's own
# default search list after $PATH (apptainer.conf `binary path`), so that hpcexp's view of
# which tools exist is Apptainer's.
HOST_TOOL_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def find_host_tool(program: str, env: Mapping[str, str] | None = None) -> str | None:
    """Where a host tool Apptainer runs is: on PATH (of ``env`` if given), else in HOST_TOOL_DIRS.

    For tools hpcexp hands to Apptainer (debootstrap, fakeroot, newuidmap, squashfuse), not
    for commands hpcexp runs itself (those follow the user's PATH, e.g. `module load slurm`).
    """
    return which(program, env) or _which(program, os.pathsep.join(HOST_TOOL_DIRS))


def host_tool_path(path: str | None) -> str:
    """``path`` with every HOST_TOOL_DIRS folder it lacks appended (never ahead of the user's own)."""
    own = path or ""
    have = own.split(os.pathsep)
    return os.pathsep.join([p for p in (own, *(d for d in HOST_TOOL_DIRS if d not in have)) if p])


def require(program: str, env: Mapping[str, str] | None = None) -> str:
    """The full path of ``program``, or an EnvironmentProblem naming the fix."""
    found = which(program, env)
    if found is None:
        raise EnvironmentProblem(
            f"`{program}` not found on PATH",
            hint=INSTALL_HINTS.get(program, f"install {program} or add it to PATH"),
        )
    return found


def describe(argv: Sequence[str]) -> str:
    """A copy-pasteable rendering of ``argv`` for logs and messages (quoted once)."""
    return shlex.join(list(argv))


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
    timeout: float | None = None,
) -> Result:
    """Run ``argv`` to completion and capture its output.

    A missing program raises EnvironmentProblem; a timeout raises EnvironmentProblem too
    (the tool did not answer), naming the command. Any exit code is returned, not raised:
    what it means is the caller's business.
    """
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError("empty argv")
    exe = require(argv[0], env) if os.sep not in argv[0] else argv[0]
    log.debug("run: %s", describe(argv))
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise EnvironmentProblem(
            f"`{argv[0]}` could not be started: {exc.strerror}",
            hint=INSTALL_HINTS.get(os.path.basename(argv[0])),
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentProblem(f"`{describe(argv)}` did not answer within {timeout:g} s") from exc
    log.debug("exit %d: %s", proc.returncode, argv[0])
    return Result(tuple(argv), proc.returncode, proc.stdout or "", proc.stderr or "")


def spawn(argv: Sequence[str], **popen: Any) -> "subprocess.Popen[Any]":
    """Start ``argv`` (a list, never a shell string) and return the live process.

    For children hpcexp must watch while they run (a container, a build, the detached
    supervisor): the caller owns waiting, output and signals. ``OSError`` propagates, so
    each caller can say in its own terms what could not be started.
    """
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError("empty argv")
    popen.pop("shell", None)  # never a shell
    log.debug("spawn: %s", describe(argv))
    return subprocess.Popen(argv, **popen)  # noqa: S603 - an argument list, no shell


# The watchdog's whole program. It runs with -I -S (no site, no user paths: fast and
# immune to the user's environment) and imports only hpcexp.infra.watchdog, which uses the
# standard library's os, signal and time alone.
_WATCHDOG = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from hpcexp.infra.watchdog import main; main(sys.argv[2:])")

# What waits for the owner: a POSIX shell, whose start-up costs a tenth of an interpreter's
# (every local run and build starts a watchdog). It ignores the signals the Python
# watchdog ignores (ignored signals stay ignored across exec) and blocks reading the pipe;
# the release byte ends it, and only end of file without it (the owner died) execs the
# interpreter that kills the group, with stdin still at end of file.
_WAITER = ("trap '' INT HUP TERM QUIT USR1; IFS= read -r done; "
           '[ "$done" = x ] && exit 0; py=$1; shift; exec "$py" -I -S -c "$@"')
_SHELL = "/bin/sh"


class Watchdog:
    """A separate process that kills a process group if its owner dies before :meth:`release`.

    Why: Apptainer's process trees (the starter, fakeroot re-execs, the container) outlive
    a killed parent, and ``PR_SET_PDEATHSIG`` does not survive Apptainer's re-exec. The
    watchdog blocks reading a pipe from its owner; end of file without the release byte
    means the owner died (kill -9, OOM killer), and it kills the group (and the processes
    carrying ``marker``). It is exec'd, never forked, so it is safe to start from a
    process that already has threads, and it lives in its own session and ignores
    SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1, so terminal signals and ``pkill -f
    hpcexp`` do not stop it. It waits as a shell (cheap to start) and becomes the Python
    program of :mod:`hpcexp.infra.watchdog` only when it has work to do.

    One design for every child hpcexp must not leave behind: builds and local runs.
    """

    def __init__(self, proc: "subprocess.Popen[bytes]") -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    def start(cls, pgid: int, *, marker: str | None = None, grace: float = 2.0) -> "Watchdog | None":
        """Watch group ``pgid``; None (logged) where no watchdog could be started."""
        import sys

        import hpcexp

        root = os.path.dirname(os.path.dirname(os.path.abspath(hpcexp.__file__)))
        program = [_WATCHDOG, root, str(pgid), marker or "", f"{grace:g}"]
        argv = ([_SHELL, "-c", _WAITER, "hpcexp-watchdog", sys.executable, *program] if os.access(_SHELL, os.X_OK)
                else [sys.executable, "-I", "-S", "-c", *program])
        try:
            proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         close_fds=True, start_new_session=True)
        except OSError as exc:
            log.info("no watchdog for process group %d: %s", pgid, exc)
            return None
        return cls(proc)

    def release(self) -> None:
        """The owner is done: tell the watchdog to exit without killing anything, and reap it."""
        release_watcher(self._proc)


def release_watcher(proc: "subprocess.Popen[bytes]", timeout: float = 10.0) -> None:
    """Tell a child that watches its owner through a pipe (a watchdog, a guard, a session's
    keeper) that the owner let go on purpose: the release byte, then end of file, then reap
    it (at most ``timeout`` s). End of file alone would mean the owner died."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.write(b"x")
            proc.stdin.flush()
        with contextlib.suppress(OSError):
            proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
