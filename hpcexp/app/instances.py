"""Use cases of remote-call sessions: ``instance start``, ``instance stop``, ``instance
list``, and finding a session to attach to (``hpcexp.remote.connect``).

A session is a run of an experiment that declares ``remote:`` (see
:mod:`hpcexp.execute.instance`). The builder and the executors are imported inside the
functions: ``hpcexp instance list`` must not pay for the builder at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from hpcexp.app.progress import Progress, silent
from hpcexp.app.runs import parse_params, reconciled
from hpcexp.core import runs
from hpcexp.core.config import Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord
from hpcexp.errors import EnvironmentProblem, HpcexpError, NotFound, PayloadFailed, UsageError

Item = tuple[RunPaths, RunRecord]


@dataclass(frozen=True)
class InstanceStartRequest:
    """``owned``: the session ends when the caller closes it or dies (``hpcexp.remote``);
    otherwise it runs until ``instance stop``."""

    name: str
    params: Sequence[str] | Mapping[str, str] = ()
    owned: bool = False
    arch: str | None = None
    rebuild: bool = False
    quiet: bool = False
    wait: float = 300.0
    cmdline: tuple[str, ...] | None = None


@dataclass(frozen=True)
class InstanceStartResult:
    paths: RunPaths
    record: RunRecord
    keeper: Any = None                   # the keeper's Popen (owned sessions: its stdin is the lease)
    failure: HpcexpError | None = None

    @property
    def socket(self) -> str:
        return str(self.record.extra.get("socket") or self.paths.remote_socket)


def _session_failure(paths: RunPaths, rec: RunRecord) -> HpcexpError | None:
    if rec.state == "running":
        return None
    if rec.launch_error:
        return EnvironmentProblem(f"session {rec.run_id}: apptainer could not start the instance: "
                                  f"{rec.launch_error}", hint=f"hpcexp status {rec.run_id}")
    return PayloadFailed(f"session {rec.run_id} of {rec.experiment!r} is not serving: "
                         f"{rec.reason or rec.state}", code=rec.exit_code,
                         hint=f"hpcexp logs --stderr {rec.run_id}")


def start(project: Project, req: InstanceStartRequest, progress: Progress | None = None) -> InstanceStartResult:
    """Build the image if needed, start the session and wait until its server listens."""
    from hpcexp.build.image import ensure_image
    from hpcexp.core.config import host_arch
    from hpcexp.execute import instance

    report = progress or silent
    exp = project.experiment(req.name)
    if exp.remote is None:
        raise UsageError(f"experiment {exp.name!r} serves nothing: hpcexp.yaml has no experiments.{exp.name}.remote",
                         hint=f"add `remote: {{module: MODULE, factory: FUNCTION}}` under experiments.{exp.name}")
    from hpcexp.runtime import launch

    launch.check_binds(project, exp)
    params = parse_params(req.params)
    if not req.wait > 0:
        raise UsageError(f"invalid wait {req.wait!r}: seconds, more than 0")
    arch = req.arch or host_arch()
    image = ensure_image(project, exp, arch, force=req.rebuild, quiet=req.quiet, progress=report, pull=True)
    paths, rec = instance.prepare(project, exp, image, params=params, owned=req.owned, arch=arch,
                                  cmdline=req.cmdline)
    report("created", f"session {rec.run_id} ({paths.dir})")
    try:
        keeper = instance.spawn_keeper(paths, owned=req.owned)
    except OSError as exc:
        rec.state, rec.ended_at = "failed", runs.utcnow()
        rec.launch_error = f"the session's keeper could not be started: {exc}"
        runs.write_record(paths, rec)
        return InstanceStartResult(paths, rec, None, _session_failure(paths, rec))
    rec = instance.wait_ready(paths, keeper, wait=req.wait)
    if not req.owned:
        keeper.returncode = 0  # not reaped by us: it outlives this process on purpose
    return InstanceStartResult(paths, rec, keeper if req.owned else None, _session_failure(paths, rec))


# --------------------------------------------------------------------------------------
# list / find / stop
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstanceListRequest:
    name: str | None = None
    all: bool = False              # ended sessions too


@dataclass(frozen=True)
class InstanceListResult:
    items: list[Item] = field(default_factory=list)
    alive: dict[str, bool] = field(default_factory=dict)    # run id -> its Apptainer instance is listed


def _sessions(project: Project, name: str | None) -> list[Item]:
    from hpcexp.execute.instance import is_session

    layout = Layout(project)
    if name is not None:
        project.experiment(name)
    found = [(p, r) for p, r in runs.iter_runs(layout, name) if is_session(r)]
    return reconciled(layout, found)


def _listed_instances() -> set[str] | None:
    """Names of this user's Apptainer instances; None when Apptainer cannot say."""
    from hpcexp.infra import process
    from hpcexp.runtime import apptainer, instances

    inst = apptainer.detect()
    if inst is None:
        return None
    try:
        res = process.run(instances.instance_list_argv(program=inst.path), env=apptainer.clean_env(), timeout=60)
        return {i.name for i in instances.parse_instance_list(res.stdout)} if res.ok else None
    except (HpcexpError, ValueError):
        return None


def list_sessions(project: Project, req: InstanceListRequest) -> InstanceListResult:
    """Sessions that serve now (``all``: every session ever started), newest last."""
    items = _sessions(project, req.name)
    if not req.all:
        items = [(p, r) for p, r in items if not r.terminal]
    listed = _listed_instances() if items else set()
    alive = {r.run_id: (r.extra.get("instance") in listed) if listed is not None else (not r.terminal)
             for _, r in items}
    return InstanceListResult(items=items, alive=alive)


def find_attachable(project: Project, name: str) -> Item | None:
    """The newest serving session of ``name`` started by ``instance start`` (not owned by a client)."""
    for paths, rec in reversed(_sessions(project, name)):
        if rec.state == "running" and not rec.extra.get("owned") and rec.user == _me():
            return paths, rec
    return None


def _me() -> str:
    from hpcexp.infra import host

    return host.user()


@dataclass(frozen=True)
class InstanceStopRequest:
    """Each ref: an experiment name (all its serving sessions) or a session's run id (or prefix)."""

    refs: tuple[str, ...]
    grace: float = 10.0


@dataclass(frozen=True)
class InstanceStopResult:
    before: list[Item]
    after: list[Item]


def stop(project: Project, req: InstanceStopRequest) -> InstanceStopResult:
    from hpcexp.execute import base
    from hpcexp.execute.instance import is_session

    if not req.refs:
        raise UsageError("name at least one experiment or session to stop")
    layout = Layout(project)
    chosen: dict[str, Item] = {}
    for ref in req.refs:
        if ref in project.experiments:
            serving = [(p, r) for p, r in _sessions(project, ref) if not r.terminal]
            if not serving:
                raise NotFound(f"experiment {ref!r} has no serving session", hint="hpcexp instance list")
            items = serving
        else:
            items = runs.resolve(layout, ref)
            wrong = [r.run_id for _, r in items if not is_session(r)]
            if wrong:
                raise UsageError(f"run {wrong[0]} is not an instance session", hint="stop it with `hpcexp stop`")
        for p, r in items:
            chosen[r.run_id] = (p, r)
    before = list(chosen.values())
    after = base.stop(layout, before, grace=req.grace)
    return InstanceStopResult(before=before, after=after)
