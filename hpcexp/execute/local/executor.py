"""The local executor as an :class:`hpcexp.execute.base.Executor` (registered as ``local``).

A thin adapter: it checks the options a local run understands and hands the work to the
launcher (:mod:`hpcexp.execute.local.launcher`) and to stop and reconcile
(:mod:`hpcexp.execute.local.control`).
"""

from __future__ import annotations

from typing import Sequence

from hpcexp.core import runs
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import UsageError
from hpcexp.execute.base import LaunchRequest, LogFile
from hpcexp.execute.local.control import reconcile, stop
from hpcexp.execute.local.launcher import start_run
from hpcexp.execute.local.supervisor import DEFAULT_GRACE


class LocalExecutor:
    """The local executor as an :class:`hpcexp.execute.base.Executor`: runs on this host."""

    name = "local"
    poll_interval = 2.0
    OPTIONS = frozenset({"detach", "gpu", "writable", "grace", "tee", "interactive", "on_created"})

    def launch(self, request: LaunchRequest) -> tuple[RunPaths, runs.RunRecord]:
        unknown = sorted(set(request.options) - self.OPTIONS)
        if unknown:
            raise UsageError(f"the local executor has no option {unknown[0]!r}")
        if len(request.param_sets) != 1:
            raise UsageError("a local run takes one parameter set; submit a sweep through Slurm "
                             "(`hpcexp submit --sweep`)")
        return start_run(request.project, request.experiment, request.image, params=request.param_sets[0],
                         args=request.args, arch=request.arch, allow_binds=request.allow_binds,
                         cmdline=request.cmdline, **request.options)

    def reconcile(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]]
                  ) -> list[tuple[RunPaths, runs.RunRecord]]:
        return reconcile(layout, items)

    def stop(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]], *,
             grace: float | None = None) -> list[tuple[RunPaths, runs.RunRecord]]:
        return stop(layout, items, grace=DEFAULT_GRACE if grace is None else grace)

    def log_files(self, paths: RunPaths, rec: runs.RunRecord) -> list[LogFile]:
        return [LogFile("stdout", paths.attempt_stdout(rec.attempt)),
                LogFile("stderr", paths.attempt_stderr(rec.attempt))]

    def doctor_checks(self) -> list[tuple[str, str, str, str]]:
        return []  # what a local run needs (apptainer, userns, squashfuse) is the machine's, checked by doctor


EXECUTOR = LocalExecutor()
