"""One error hierarchy for hpcexp; the exit code belongs to the type.

Library code raises these and never exits or prints; the CLI edge (``hpcexp.cli.main``)
turns them into a one-line message on stderr and the exit code below. The codes are
documented in README.md ("Exit codes") and are part of the public contract: scripts
branch on them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

MAX_VALUE_CHARS = 80
"""A user value quoted in a message is cut to this many characters (see :func:`shown`)."""
MAX_LINE_CHARS = 1000
"""No message line printed by the CLI is longer than this (see :func:`clip_line`)."""


def shown(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr`` of a user-supplied value for a message, cut to ``limit`` characters.

    The one place that decides how much of a user's value a message may quote: a ref of
    thousands of characters, or a file's content, never turns into a wall of text.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(str(value))} characters)"


def clip_line(line: str, limit: int = MAX_LINE_CHARS) -> str:
    """One message line cut to ``limit`` characters (the CLI's last guard on long messages)."""
    return line if len(line) <= limit else f"{line[: limit - 1]}… ({len(line) - limit + 1} more characters)"


class HpcexpError(Exception):
    """Base of every error hpcexp reports to a user. ``str(err)`` is the one-line message."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        """The lines the CLI prints: the message, then a hint saying what to do next."""
        out = [self.message]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out

    def __str__(self) -> str:
        return self.message


class Failure(HpcexpError):
    """A check that came out negative (stale recipe, archive that does not verify)."""

    exit_code = 1


class UsageError(HpcexpError):
    """Bad input on the command line or in a file the user gave us."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more problems in hpcexp.yaml (or another config file); all are listed at once."""

    exit_code = 2

    def __init__(self, problems: Sequence[str] | str, *, hint: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        first = self.problems[0] if self.problems else "invalid configuration"
        more = len(self.problems) - 1
        summary = first if more == 0 else f"{first} (and {more} more)"
        super().__init__(summary, hint=hint)

    def lines(self) -> list[str]:
        out = list(self.problems)
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out


class NotFound(UsageError):
    """A named thing (experiment, run, Dockerfile, archive) does not exist."""

    exit_code = 2


class EnvironmentProblem(HpcexpError):
    """The machine lacks something hpcexp needs (apptainer, userns, subuid, a Slurm controller)."""

    exit_code = 3


class ConvertError(HpcexpError):
    """A Dockerfile could not be turned into a recipe."""

    exit_code = 2


class BuildError(HpcexpError):
    """``apptainer build`` failed; the message carries the log path and last lines."""

    exit_code = 4


class PayloadFailed(HpcexpError):
    """The experiment itself ran and exited non-zero (its own code is in the run record)."""

    exit_code = 5

    def __init__(self, message: str, *, code: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class RemoteError(PayloadFailed):
    """A call into an instance failed on the far side (``hpcexp.remote``).

    ``kind`` is ``call`` (the served method raised: ``remote_type`` is the exception's
    class name and ``remote_traceback`` its traceback text, which ``str()`` shows too),
    ``protocol`` (the server refused the message: not JSON, too large, no such method),
    ``result`` (the result was not JSON) or ``connection`` (the session is gone).
    """

    def __init__(self, message: str, *, kind: str = "call", remote_type: str | None = None,
                 remote_traceback: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        if not self.remote_traceback:
            return self.message
        return f"{self.message}\n\nRemote traceback (inside the container):\n{self.remote_traceback.rstrip()}"


class RemoteTimeout(RemoteError):
    """A remote call did not answer within its timeout (the session itself goes on)."""


class SchedulerError(HpcexpError):
    """Slurm refused a submission or could not be reached."""

    exit_code = 6


class TrackingError(HpcexpError):
    """The tracking server (MLflow) refused a request, or could not be reached."""

    exit_code = 6


class StorageError(HpcexpError):
    """Writing failed: disk full, quota, read-only file system (EX_IOERR)."""

    exit_code = 74


class LockBusy(HpcexpError):
    """Someone else holds a lock we need and we were told not to wait (EX_TEMPFAIL)."""

    exit_code = 75


class PermissionProblem(HpcexpError):
    """A path we must read or write is not ours to touch (EX_NOPERM)."""

    exit_code = 77


class Interrupted(HpcexpError):
    """The user pressed Ctrl-C (or we got SIGTERM) and hpcexp cleaned up."""

    exit_code = 130


# Registry (hpcexp.build.registry and its helpers)

class RegistryError(EnvironmentProblem):
    """The registry did not answer, refused us, or TLS/credentials failed (exit code 3)."""


class PinMismatch(Failure):
    """What we got is not what the lock pins (sha256 or digest differs): exit code 1."""


class SignatureRefused(Failure):
    """The image's signature does not satisfy ``verify:`` (exit code 1); it is not published or run."""


class StalePin(UsageError):
    """The lock pins another input hash than the current inputs give (exit code 2)."""


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "a check failed (stale recipe, archive does not verify) or an unexpected error",
    2: "bad usage, configuration or input (names the file, key and value)",
    3: "the machine lacks something required (see `hpcexp doctor`)",
    4: "an image build failed (the message names the build log)",
    5: "the experiment ran and failed (its own exit code is in the run record)",
    6: "the scheduler or the tracking server refused or could not be reached",
    74: "an I/O error such as a full disk; nothing half-written was left",
    75: "a lock is held by another process",
    77: "permission denied on a path hpcexp must use",
    130: "interrupted (Ctrl-C, or SIGTERM in archive/extract); nothing half-written was left",
}


def join_problems(problems: Iterable[str]) -> str:
    """Join several problems into one line (for places that must stay on one line)."""
    return "; ".join(problems)
