"""The Slurm executor as an :class:`hpcexp.execute.base.Executor`: what the registry hands
to ``status``, ``logs``, ``stop``, ``submit`` and ``doctor``. A thin adapter: every step is
one call into :mod:`.submit`, :mod:`.reconcile` or :mod:`.facts`.
"""

from __future__ import annotations

from typing import Sequence

from hpcexp.core import runs
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import UsageError
from hpcexp.execute.base import LaunchRequest, LogFile
from hpcexp.execute.slurm.facts import doctor_checks
from hpcexp.execute.slurm.reconcile import reconcile, stop
from hpcexp.execute.slurm.submit import Submission, submit_runs


class SlurmExecutor:
    """The Slurm executor as an :class:`hpcexp.execute.base.Executor`: one job, or one job array."""

    name = "slurm"
    poll_interval = 10.0
    OPTIONS = frozenset({"resources", "sweep", "hold", "dry_run"})

    def launch(self, request: LaunchRequest) -> Submission:
        unknown = sorted(set(request.options) - self.OPTIONS)
        if unknown:
            raise UsageError(f"the Slurm executor has no option {unknown[0]!r}")
        opts = dict(request.options)
        resources = opts.pop("resources", None) or request.experiment.slurm
        return submit_runs(request.project, request.experiment, request.image, list(request.param_sets),
                           resources, args=request.args, arch=request.arch, allow_binds=request.allow_binds,
                           cmdline=request.cmdline, **opts)

    def reconcile(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]]
                  ) -> list[tuple[RunPaths, runs.RunRecord]]:
        return reconcile(layout, items)

    def stop(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]], *,
             grace: float | None = None) -> list[tuple[RunPaths, runs.RunRecord]]:
        # Slurm applies its own KillWait between SIGTERM and SIGKILL; grace is not ours to set
        return stop(layout, items)

    def log_files(self, paths: RunPaths, rec: runs.RunRecord) -> list[LogFile]:
        return [LogFile("stdout", paths.attempt_stdout(rec.attempt)),
                LogFile("stderr", paths.attempt_stderr(rec.attempt))]

    def doctor_checks(self) -> list[tuple[str, str, str, str]]:
        return doctor_checks()


EXECUTOR = SlurmExecutor()
