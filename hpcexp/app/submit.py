"""Use cases through Slurm: ``submit`` (one job, or ONE job array for a sweep), ``resubmit``
(a sweep's failed tasks again) and ``wait`` (until every task has settled).

Every value is checked here, once, before the image is built or anything is written:
parameters, sweep values, resources, job arguments. The Slurm executor and the sweep
expansion are imported when a use case runs (``hpcexp --help`` never pays for them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from hpcexp.app.progress import Progress
from hpcexp.app.runs import parse_params, summarize
from hpcexp.core.config import Project, SlurmResources, check_name
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord
from hpcexp.errors import HpcexpError, PayloadFailed, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.execute.slurm import Submission


@dataclass(frozen=True)
class SubmitRequest:
    """``sweeps``: ``KEY=V1,V2,...`` items (their cartesian product); ``sweep_file``: a
    YAML/JSON/CSV/TSV file of parameter sets, inside the project. ``resources`` override
    hpcexp.yaml's (``None`` fields are not set here)."""

    name: str
    params: Sequence[str] | Mapping[str, str] = ()
    args: tuple[str, ...] | None = None
    sweeps: tuple[str, ...] = ()
    sweep_file: Path | None = None
    resources: SlurmResources = SlurmResources()
    hold: bool = False
    dry_run: bool = False        # render the job scripts; submit and write nothing
    allow_binds: bool = False
    wait: bool = False           # (with submit_and_wait) block until every task has settled
    arch: str | None = None
    quiet: bool = False
    cmdline: tuple[str, ...] | None = None
    checkpoint_signal: str | None = None   # SIG[@SECONDS]: overrides the experiment's checkpoint:

    def __post_init__(self) -> None:
        # refused when the request is made, before a project is even looked for
        if self.wait and self.hold:
            raise UsageError("--wait with --hold would wait forever: the job stays held until released")


def check_submit(project: Project, req: SubmitRequest) -> tuple[Any, list[dict[str, str]], SlurmResources, bool]:
    """Everything a submission needs, checked: (experiment, parameter sets, merged resources, is a sweep)."""
    from hpcexp.execute import slurm, sweep
    from hpcexp.execute.slurm import sbatch
    from hpcexp.runtime import launch

    exp = project.experiment(req.name)
    if req.checkpoint_signal is not None:
        from hpcexp.core.model import parse_checkpoint_signal

        parse_checkpoint_signal(req.checkpoint_signal)  # refused before anything is built
    launch.check_binds(project, exp, allow_binds=req.allow_binds)
    fixed = parse_params(req.params)
    grid = [sweep.parse_sweep_option(s) for s in req.sweeps]
    file_sets = sweep.load_sweep_file(Path(req.sweep_file), inside=project.root) if req.sweep_file else []
    param_sets = sweep.product(fixed, grid, file_sets)
    slurm.check_resources(req.resources)
    resources = exp.slurm.merged(req.resources)
    for a in req.args or ():
        sbatch.check_value("argument", a)
    for a in resources.sbatch_args:
        sbatch.check_value("--sbatch-arg", a)
    return exp, param_sets, resources, bool(grid or file_sets)


@dataclass(frozen=True)
class SubmitResult:
    submission: "Submission"             # records, job ids, rendered scripts (dry run)
    waited: "WaitResult | None" = None


def submit(project: Project, req: SubmitRequest, progress: Progress | None = None) -> SubmitResult:
    """Check, find or build the image on this (login) node, then submit; never waits."""
    from hpcexp.build import image
    from hpcexp.core.config import host_arch
    from hpcexp.execute import slurm

    exp, param_sets, resources, is_sweep = check_submit(project, req)
    arch = req.arch or host_arch()
    if req.dry_run:
        image_ref: Any = image.prepare(project, exp, arch, write=False).image
    else:
        # A pinned image not built here is pulled now, on the login node, before any job starts.
        image_ref = image.ensure_image(project, exp, arch, quiet=req.quiet, progress=progress, pull=True)
    svc_images = None
    if exp.services:  # built here too, like the payload's image
        from hpcexp.app.services import service_images

        svc_images = service_images(project, exp, arch, quiet=req.quiet, progress=progress, dry_run=req.dry_run)
    payload_env, env_probe = (None, None)
    if exp.tracking is not None and not req.dry_run:
        from hpcexp.app.tracking import slurm_payload_env

        payload_env, env_probe = slurm_payload_env(project, exp, param_sets)
    checkpoint = None
    if req.checkpoint_signal is not None:
        from hpcexp.core.model import parse_checkpoint_signal

        checkpoint = parse_checkpoint_signal(req.checkpoint_signal)
    sub = slurm.submit_runs(project, exp, image_ref, param_sets, resources,
                            args=list(req.args) if req.args else None, sweep=is_sweep, arch=arch, hold=req.hold,
                            dry_run=req.dry_run, allow_binds=req.allow_binds,
                            cmdline=list(req.cmdline) if req.cmdline is not None else None,
                            payload_env=payload_env, env_probe=env_probe, service_images=svc_images,
                            checkpoint=checkpoint)
    return SubmitResult(sub)


def submit_and_wait(project: Project, req: SubmitRequest, progress: Progress | None = None,
                    on_submitted: Callable[["Submission"], None] | None = None,
                    on_change: Callable[[str], None] | None = None) -> SubmitResult:
    """:func:`submit`, then (``req.wait``, not a dry run) :func:`wait` for its runs."""
    result = submit(project, req, progress)
    if not req.wait or req.dry_run:
        return result
    if on_submitted is not None:
        on_submitted(result.submission)
    return SubmitResult(result.submission, wait(project, WaitRequest.of(result.submission), on_change=on_change))


@dataclass(frozen=True)
class WaitRequest:
    run_dirs: tuple[Path, ...]
    what: str                        # "sweep ID" or "run ID", for messages
    sweep_id: str | None = None

    @classmethod
    def of(cls, sub: "Submission") -> "WaitRequest":
        what = f"sweep {sub.sweep_id}" if sub.sweep_id else f"run {sub.runs[0][1].run_id}"
        return cls(tuple(paths.dir for paths, _ in sub.runs), what, sub.sweep_id)


@dataclass(frozen=True)
class WaitResult:
    items: list[tuple[RunPaths, RunRecord]]
    failure: HpcexpError | None      # some task did not succeed


def wait(project: Project, req: WaitRequest, on_change: Callable[[str], None] | None = None) -> WaitResult:
    """Block until every run has settled (one reconcile per round for all of them);
    ``on_change`` gets a summary line whenever the set of states changes."""
    from hpcexp.execute import slurm

    final = slurm.wait(Layout(project), list(req.run_dirs),
                       on_change=None if on_change is None else lambda recs: on_change(f"{req.what}: "
                                                                                         f"{summarize(recs)}"))
    items = [(RunPaths(d), rec) for d, rec in zip(req.run_dirs, final)]
    bad = [rec for rec in final if rec.state != "succeeded"]
    failure = None
    if bad:
        failure = PayloadFailed(f"{req.what}: {summarize(final)}",
                                hint=f"hpcexp status {req.sweep_id or bad[0].run_id}; "
                                     f"hpcexp logs --stderr {bad[0].run_id}")
    return WaitResult(items, failure)


@dataclass(frozen=True)
class ResubmitRequest:
    sweep_id: str
    cancelled: bool = False          # also the cancelled tasks (failed ones always)
    resources: SlurmResources = SlurmResources()
    hold: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        check_name(self.sweep_id, "sweep id")


def resubmit(project: Project, req: ResubmitRequest) -> "Submission":
    """The sweep's failed (and optionally cancelled) tasks again, as one new job array."""
    from hpcexp.execute import slurm, sweep

    which = list(sweep.FAILED_STATES) + (["cancelled"] if req.cancelled else [])
    slurm.check_resources(req.resources)
    # The Slurm executor is taking this over from the sweep module; either place works.
    again = getattr(slurm, "resubmit_sweep", None) or sweep.resubmit
    return again(project, req.sweep_id, which=which, hold=req.hold, dry_run=req.dry_run, resources=req.resources)
