"""The local executor: start a run's container here, supervise it, stop it, and notice when it is lost.

The package's face; the work is split by who does it, and when:

* :mod:`~hpcexp.execute.local.launcher`: ``hpcexp run`` creates the run (folder and
  ``created`` record, before anything starts) and starts its supervisor, here or detached;
* :mod:`~hpcexp.execute.local.supervisor`: the one process that starts ``apptainer``, copies
  its output, acts on stop signals and records how the run ended (the watchdog and the
  exit decoding are described there); ``python -m hpcexp.execute.local RUN_DIR`` runs its
  :func:`main`;
* :mod:`~hpcexp.execute.local.control`: any hpcexp process on the host stops runs and
  records the ones whose supervisor is gone ``lost``;
* :mod:`~hpcexp.runtime.versions` (used from here): the runtime's version, remembered per binary;
* :mod:`~hpcexp.execute.local.executor`: ``LocalExecutor``, the
  :class:`hpcexp.execute.base.Executor` registered as ``local``.
"""

from __future__ import annotations

from hpcexp.execute.local.control import CREATED_PATIENCE, reconcile, stop, trusted_pgid
from hpcexp.execute.local.executor import EXECUTOR, LocalExecutor
from hpcexp.execute.local.launcher import prepare_run, spawn_detached, start_run
from hpcexp.execute.local.supervisor import DEFAULT_GRACE, MARKER, main, supervise
from hpcexp.runtime.versions import known_version

__all__ = [
    "CREATED_PATIENCE", "DEFAULT_GRACE", "EXECUTOR", "MARKER", "LocalExecutor", "known_version", "main",
    "prepare_run", "reconcile", "spawn_detached", "start_run", "stop", "supervise", "trusted_pgid",
]
