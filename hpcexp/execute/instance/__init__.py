"""Remote-call sessions: an experiment's image kept running as an Apptainer instance that
serves its ``remote:`` object to the host (see :mod:`~hpcexp.execute.instance.session`).

Sessions are local runs (executor ``local``): ``status``, ``logs`` and ``stop`` treat them
as any other run, and their keeper answers a stop as a run's supervisor does.
"""

from __future__ import annotations

from hpcexp.execute.instance.session import (
    KIND,
    is_session,
    keep,
    main,
    prepare,
    spawn_keeper,
    wait_ready,
)

__all__ = ["KIND", "is_session", "keep", "main", "prepare", "spawn_keeper", "wait_ready"]
