"""A guard: a separate process that runs one command should its owner die before
releasing it (kill -9, the OOM killer).

For what :class:`hpcexp.infra.process.Watchdog` cannot find: an Apptainer instance
daemonises out of its owner's process group, and its processes carry a run's marker only
inside Apptainer's own configuration, so a session's keeper leaves its
``apptainer instance stop --force NAME`` with a guard. The guard blocks reading a pipe
from its owner, as the watchdog does: the release byte means the owner cleaned up
itself; end of file without it means the owner died, and the guard execs the command.

Imports the standard library's ``os`` and :mod:`hpcexp.infra.watchdog` (``os``, ``signal``,
``time``) only: it runs with ``python -I -S``.
"""

from __future__ import annotations

import os

from hpcexp.infra.watchdog import owner_released

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Sequence

#: the guard's whole program (see :func:`main`)
PROGRAM = ("import sys; sys.path.insert(0, sys.argv[1]); "
           "from hpcexp.infra.guard import main; main(sys.argv[2:])")


def main(stop_argv: Sequence[str]) -> None:  # pragma: no cover - runs in the guard process
    """Wait for the owner's byte on stdin; end of file without it execs ``stop_argv``."""
    if not owner_released() and stop_argv:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.execv(stop_argv[0], list(stop_argv))
