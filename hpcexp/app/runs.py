"""Use cases of runs, whichever executor ran them: ``run`` (local), ``status``, ``runs``,
``logs`` (show and follow) and ``stop``.

``status``, ``logs`` and ``stop`` go through :mod:`hpcexp.execute.base`, so they never
care which executor a run belongs to. The builder and the local executor are imported
inside :func:`run` only: ``hpcexp status`` must not pay for them at start-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

from hpcexp.app.progress import Progress, silent
from hpcexp.core.config import Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.model import SERVICE_FAILURE
from hpcexp.core.runs import RunRecord
from hpcexp.errors import EnvironmentProblem, HpcexpError, Interrupted, PayloadFailed, UsageError

Item = tuple[RunPaths, RunRecord]

STATE_ORDER = ("succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "lost", "running",
               "pending", "submitting", "created", "unknown")
DEFAULT_GRACE = 10.0


def summarize(records: Sequence[RunRecord]) -> str:
    """One line such as ``8 succeeded, 2 failed, 5 pending`` (states in a fixed order)."""
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.state] = counts.get(rec.state, 0) + 1
    order = [s for s in STATE_ORDER if s in counts] + sorted(s for s in counts if s not in STATE_ORDER)
    return ", ".join(f"{counts[s]} {s}" for s in order) if order else "no runs"


def parse_params(params: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``KEY=VALUE`` items (or a mapping, as a server has them) checked once, by the same rules."""
    from hpcexp.runtime import launch

    items = [f"{k}={v}" for k, v in params.items()] if isinstance(params, Mapping) else list(params)
    return launch.parse_params(items)


def check_grace(grace: float) -> float:
    if not grace >= 0:  # also refuses NaN
        raise UsageError(f"invalid grace {grace!r}: seconds, 0 or more")
    return float(grace)


def reconciled(layout: Layout, items: Sequence[Item], *, by_time: bool = True) -> list[Item]:
    """``items`` with states brought up to date by their executors."""
    from hpcexp.execute.base import reconcile

    out = reconcile(layout, items)
    if by_time:  # ids order by the second only; two runs started in the same second go by created_at
        out = sorted(out, key=lambda t: (t[1].created_at or "", t[1].run_id))
    return out


def damaged(items: Sequence[Item]) -> list[str]:
    """One message per damaged record (shown as ``unknown``, never skipped)."""
    return [f"run {rec.run_id}: record damaged: {rec.error}" for _, rec in items if rec.error]


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunRequest:
    """``args`` None (or empty) keeps the experiment's configured args. ``tee`` copies the
    payload's output to this process's stdout/stderr and ``interactive`` forwards terminal
    signals (the CLI in the foreground); a server leaves both off."""

    name: str
    params: Sequence[str] | Mapping[str, str] = ()
    args: tuple[str, ...] | None = None
    arch: str | None = None
    detach: bool = False
    gpu: bool | None = None
    writable: bool | None = None
    allow_binds: bool = False
    grace: float = DEFAULT_GRACE
    rebuild: bool = False
    quiet: bool = False
    tee: bool = False
    interactive: bool = False
    cmdline: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RunResult:
    paths: RunPaths
    record: RunRecord
    failure: HpcexpError | None      # what the final state means for the caller (None: fine)


def run_failure(paths: RunPaths, rec: RunRecord) -> HpcexpError | None:
    """The error a run's state stands for: none while it runs or when it succeeded."""
    if rec.state in ("succeeded", "running", "created"):
        return None
    if rec.launch_error and rec.launch_error.startswith(SERVICE_FAILURE):
        return EnvironmentProblem(f"run {rec.run_id}: {rec.launch_error}",
                                  hint=f"the services' logs are in {paths.services}")
    if rec.launch_error:
        return EnvironmentProblem(f"run {rec.run_id}: apptainer could not start the container: {rec.launch_error}",
                                  hint=f"full output in {paths.stderr}")
    if rec.extra.get("service_failure") and rec.state == "failed":
        return PayloadFailed(f"run {rec.run_id} failed: {rec.extra['service_failure']}", code=rec.exit_code,
                             hint=f"the services' logs are in {paths.services}")
    if rec.state == "cancelled":
        return Interrupted(f"run {rec.run_id} was stopped ({rec.reason or 'cancelled'}); recorded as cancelled")
    what = f"exit code {rec.exit_code}" if rec.exit_code is not None else (rec.reason or rec.state)
    return PayloadFailed(f"run {rec.run_id} failed with {what}; see {paths.stderr}", code=rec.exit_code,
                         hint=f"hpcexp logs --stderr {rec.run_id}")


def run(project: Project, req: RunRequest, progress: Progress | None = None) -> RunResult:
    """Run an experiment here: check binds and parameters, find or build the image, start.

    Everything is checked before anything is built or written. Progress: ``warn``,
    the builder's kinds, and ``created`` once the run's record exists (foreground only).
    """
    from hpcexp.build.image import ensure_image
    from hpcexp.core.config import host_arch
    from hpcexp.execute import local
    from hpcexp.runtime import apptainer, launch

    report = progress or silent
    exp = project.experiment(req.name)
    launch.check_binds(project, exp, allow_binds=req.allow_binds)
    params = parse_params(req.params)
    grace = check_grace(req.grace)
    arch = req.arch or host_arch()
    dropped = apptainer.scrubbed_vars()
    if dropped:
        report("warn", f"ignoring {', '.join(dropped)} from your shell (binds and environment come from "
                       "hpcexp.yaml)")
    svc_images = None
    if exp.services:  # their images first: a missing SIF file costs no build
        from hpcexp.app.services import service_images

        svc_images = service_images(project, exp, arch, quiet=req.quiet, progress=report)
    # pull: a pinned image not built here is pulled by digest instead of built
    image = ensure_image(project, exp, arch, force=req.rebuild, quiet=req.quiet, progress=report, pull=True)

    def created(paths: RunPaths, rec: RunRecord) -> None:
        if not req.detach:
            report("created", f"run {rec.run_id} ({paths.dir})")

    payload_env = None
    if exp.tracking is not None:  # the payload gets MLFLOW_TRACKING_URI and its MLflow run id
        from hpcexp.app.tracking import local_payload_env

        payload_env = local_payload_env(project, exp, params)
    paths, rec = local.start_run(project, exp, image, params=params, args=list(req.args) if req.args else None,
                                 arch=arch, gpu=req.gpu, writable=req.writable, allow_binds=req.allow_binds,
                                 detach=req.detach, grace=grace, tee=req.tee, interactive=req.interactive,
                                 cmdline=list(req.cmdline) if req.cmdline is not None else None,
                                 on_created=created, payload_env=payload_env, service_images=svc_images)
    if exp.tracking is not None and not req.detach:
        from hpcexp.app.tracking import after_local_run

        note = after_local_run(project, paths, rec)
        if note:
            report("info", note)
    return RunResult(paths, rec, run_failure(paths, rec))


# --------------------------------------------------------------------------------------
# status / runs
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StatusRequest:
    ref: str | None = None       # None: every run; else an id, prefix, experiment, @last or sweep id
    export: bool = True          # start the background export of finished runs not exported yet
    describe: bool = True        # say where each run was exported (tracking configured)


@dataclass(frozen=True)
class StatusResult:
    ref: str | None
    items: list[Item]
    tracked: bool = False        # the project configures tracking: rows say where runs were exported
    tracking: list[dict[str, Any] | None] = field(default_factory=list)   # one per item (tracked, described)
    exporting: int = 0           # finished runs not exported yet, sent in the background now

    @property
    def single(self) -> bool:
        """One run asked for by name (details, not a table)."""
        return self.ref is not None and len(self.items) == 1 and not self.items[0][1].sweep_id

    @property
    def sweep_id(self) -> str | None:
        """The sweep all the runs asked for belong to, if so."""
        if self.ref is None or not self.items:
            return None
        first = self.items[0][1].sweep_id
        return first if first and all(r.sweep_id == first for _, r in self.items) else None


def tracking_configured(project: Project) -> bool:
    """An attribute check: with no `tracking:` in hpcexp.yaml, status imports and sends nothing."""
    return project.tracking is not None or any(e.tracking is not None for e in project.experiments.values())


def status(project: Project, req: StatusRequest = StatusRequest()) -> StatusResult:
    """Runs with states brought up to date; with tracking configured, finished runs not
    exported yet are sent in the background and each run says where it was exported."""
    from hpcexp.core.runs import iter_runs, resolve

    layout = Layout(project)
    if req.ref is None:
        items = reconciled(layout, list(iter_runs(layout)))
    else:
        items = reconciled(layout, resolve(layout, req.ref), by_time=False)  # a sweep stays in task order
    if not tracking_configured(project):
        return StatusResult(req.ref, items)
    from hpcexp.app import tracking

    exporting = tracking.kick(project, items) if req.export else 0
    described = [tracking.describe(project, paths, rec) for paths, rec in items] if req.describe else []
    return StatusResult(req.ref, items, tracked=True, tracking=described, exporting=exporting)


@dataclass(frozen=True)
class RunsRequest:
    experiment: str | None = None


@dataclass(frozen=True)
class RunsResult:
    items: list[Item]


def list_runs(project: Project, req: RunsRequest = RunsRequest()) -> RunsResult:
    """Runs of one experiment (declared, or with runs left from an earlier config) or all."""
    from hpcexp.core.config import check_name
    from hpcexp.core.runs import iter_runs

    layout = Layout(project)
    name = req.experiment
    if name is not None:
        check_name(name, "experiment name")
        if name not in project.experiments and not layout.experiment_runs(name).is_dir():
            project.experiment(name)  # NotFound with a did-you-mean
    return RunsResult(reconciled(layout, list(iter_runs(layout, name))))


# --------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------

STREAMS = ("stdout", "stderr", "both")


@dataclass(frozen=True)
class LogsRequest:
    ref: str
    which: str = "stdout"        # stdout | stderr | both (lines prefixed)
    lines: int | None = None     # only the last N lines of each file


@dataclass(frozen=True)
class LogsResult:
    items: list[Item]
    files: list[tuple[str, Path]]     # (prefix, path) in the order they are shown


def log_sources(project: Project, req: LogsRequest, progress: Progress | None = None) -> LogsResult:
    """Which files a ``logs`` request shows, each with its line prefix (a sweep tags tasks)."""
    from hpcexp.core.runs import resolve
    from hpcexp.execute.base import log_files

    if req.which not in STREAMS:
        raise UsageError(f"invalid stream {req.which!r}: one of {', '.join(STREAMS)}")
    if req.lines is not None and req.lines < 0:
        raise UsageError(f"invalid line count {req.lines}: 0 or more")
    items = resolve(Layout(project), req.ref)
    for line in damaged(items):
        (progress or silent)("warn", line)
    several = len(items) > 1
    files: list[tuple[str, Path]] = []
    for paths, rec in items:
        tag = f"{rec.task_index if rec.task_index is not None else rec.run_id}" if several else ""
        for log in log_files(paths, rec):
            if req.which in (log.stream, "both"):
                label = ("out: " if log.stream == "stdout" else "err: ") if req.which == "both" else ""
                files.append(((f"[{tag}] " if several else "") + label, log.path))
    return LogsResult(items, files)


def show_logs(project: Project, req: LogsRequest, out: IO[bytes], progress: Progress | None = None) -> LogsResult:
    """Write the run's output to ``out`` once (the caller's stream; nothing is printed)."""
    from hpcexp.execute import logs

    src = log_sources(project, req, progress)
    logs.show(src.files, out=out, lines=req.lines)
    return src


def follow_logs(project: Project, req: LogsRequest, out: IO[bytes], progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None) -> LogsResult:
    """Write the output to ``out`` as it grows until every run has ended (or ``cancelled()``
    says the reader went away); the executors are asked at their own poll interval."""
    from hpcexp.core.runs import read_record
    from hpcexp.execute import logs
    from hpcexp.execute.base import poll_interval, reconcile

    src = log_sources(project, req, progress)
    layout = Layout(project)
    items = src.items
    next_poll = [0.0]

    def until() -> bool:
        if cancelled is not None and cancelled():
            return True
        now = time.monotonic()
        current = [(p, read_record(p)) for p, _ in items]
        if all(r.terminal for _, r in current):
            return True
        interval = poll_interval(r for _, r in current)
        if now >= next_poll[0]:
            next_poll[0] = now + interval
            current = reconcile(layout, current)
            return all(r.terminal for _, r in current)
        return False

    logs.follow(src.files, until, out=out, lines=req.lines)
    return src


# --------------------------------------------------------------------------------------
# stop
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StopRequest:
    refs: tuple[str, ...]
    grace: float = DEFAULT_GRACE     # seconds between SIGTERM and SIGKILL
    checkpoint: bool = False         # local runs: the checkpoint signal first, grace to save, then SIGTERM


@dataclass(frozen=True)
class StopResult:
    before: list[Item]
    after: list[Item]


def stop(project: Project, req: StopRequest) -> StopResult:
    """Stop every run the refs name (each once); a damaged record refuses all, changing nothing."""
    from hpcexp.core.runs import resolve
    from hpcexp.execute.base import stop as stop_runs

    if not req.refs:
        raise UsageError("name at least one run to stop")
    grace = check_grace(req.grace)
    layout = Layout(project)
    items: list[Item] = []
    seen = set()
    for ref in req.refs:
        for paths, rec in resolve(layout, ref):
            if paths.dir not in seen:
                seen.add(paths.dir)
                items.append((paths, rec))
    for _paths, rec in items:
        if rec.error:
            raise UsageError(f"cannot stop run {rec.run_id}: its record is damaged ({rec.error})",
                             hint="nothing was changed; inspect that run folder by hand")
    if req.checkpoint:
        others = [rec for _p, rec in items if rec.executor != "local" and not rec.terminal]
        if others:
            raise UsageError(f"stop --checkpoint is for local runs; run {others[0].run_id} runs through "
                             f"{others[0].executor}",
                             hint="a Slurm job gets its checkpoint signal before its time limit "
                                  "(checkpoint: in hpcexp.yaml, or submit --checkpoint-signal)")
        from hpcexp.execute.local.control import stop as stop_local

        return StopResult(before=items, after=stop_local(layout, items, grace=grace, checkpoint=True))
    return StopResult(before=items, after=stop_runs(layout, items, grace=grace))
