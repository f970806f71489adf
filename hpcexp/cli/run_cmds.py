"""``hpcexp run``, ``status``, ``runs``, ``logs`` and ``stop``: local runs and the run records of all executors.

Exit codes of ``hpcexp run`` (foreground): 0 the payload succeeded; 5 the payload ran and
failed (its own exit code is in the record and in the message); 3 Apptainer could not
start the container (a launch error such as a missing bind source); 4 the image build
failed; 130 interrupted (Ctrl-C; the run is stopped and recorded ``cancelled``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Sequence

import click

from hpcexp.cli.common import arch_option, echo_table, emit_json, human_age, info, json_option, pass_ctx, warn

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.cli.common import Ctx
    from hpcexp.core.layout import Layout, RunPaths
    from hpcexp.core.runs import RunRecord

STATE_ORDER = ("succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "lost", "running",
               "pending", "submitting", "created", "unknown")


# --------------------------------------------------------------------------------------
# Shared helpers (also used by the Slurm commands)
# --------------------------------------------------------------------------------------

def summarize(records: Sequence["RunRecord"]) -> str:
    """One line such as ``8 succeeded, 2 failed, 5 pending`` (states in a fixed order)."""
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.state] = counts.get(rec.state, 0) + 1
    order = [s for s in STATE_ORDER if s in counts] + sorted(s for s in counts if s not in STATE_ORDER)
    return ", ".join(f"{counts[s]} {s}" for s in order) if order else "no runs"


def _cell(value: str, limit: int = 24) -> str:
    """A parameter value made safe for one table cell: control characters escaped, long values cut."""
    out = []
    for ch in value:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    text = "".join(out)
    if " " in text or text == "":
        text = repr(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_params(params: dict[str, str], limit: int = 60) -> str:
    text = " ".join(f"{k}={_cell(str(v))}" for k, v in sorted(params.items()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def exit_cell(rec: "RunRecord") -> str:
    if rec.launch_error:
        return "launch"
    if rec.exit_code is not None:
        return str(rec.exit_code)
    if rec.signal is not None:
        return f"sig{rec.signal}"
    return "-"


def run_rows(items: Sequence[tuple["RunPaths", "RunRecord"]]) -> list[list[str]]:
    """Rows of the run table: RUN_ID, EXPERIMENT, STATE, AGE, DURATION, EXIT, PARAMS."""
    import time

    from hpcexp.core.runs import parse_time

    now = time.time()
    rows = []
    for _, rec in items:
        created = parse_time(rec.created_at)
        rows.append([rec.run_id, rec.experiment, rec.state, human_age(None if created is None else now - created),
                     human_age(rec.duration()), exit_cell(rec), format_params(rec.params)])
    return rows


def json_rows(items: Sequence[tuple["RunPaths", "RunRecord"]]) -> list[dict[str, Any]]:
    """Records for ``--json``: every row has the same keys; ``error`` says why a record is
    damaged (path and reason) and is null otherwise."""
    return [{**rec.to_dict(), "dir": str(paths.dir), "error": rec.error} for paths, rec in items]


def warn_damaged(items: Sequence[tuple["RunPaths", "RunRecord"]]) -> None:
    """One warning line per damaged record (the table shows those runs as `unknown`)."""
    for _, rec in items:
        if rec.error:
            warn(f"run {rec.run_id}: record damaged: {rec.error}")


RUN_HEADERS = ("RUN_ID", "EXPERIMENT", "STATE", "AGE", "DURATION", "EXIT", "PARAMS")


def echo_runs(items: Sequence[tuple["RunPaths", "RunRecord"]]) -> None:
    echo_table(run_rows(items), RUN_HEADERS)


def _details(paths: "RunPaths", rec: "RunRecord") -> list[str]:
    """key: value lines describing one run (status RUN)."""
    import shlex

    lines = [f"run: {rec.run_id}", f"experiment: {rec.experiment}", f"state: {rec.state}"]
    if rec.reason:
        lines.append(f"reason: {rec.reason}")
    if rec.launch_error:
        lines.append(f"launch_error: {rec.launch_error}")
    lines += [
        f"exit_code: {'-' if rec.exit_code is None else rec.exit_code}",
        f"signal: {'-' if rec.signal is None else rec.signal}",
        f"created: {rec.created_at}",
        f"started: {rec.started_at or '-'}",
        f"ended: {rec.ended_at or '-'}",
        f"duration: {human_age(rec.duration())}",
        f"executor: {rec.executor} {' '.join(f'{k}={v}' for k, v in sorted(rec.executor_ids.items()))}".rstrip(),
        f"host: {rec.host}",
        f"user: {rec.user}",
        f"params: {format_params(rec.params, limit=10_000) or '-'}",
        f"image: {rec.image or '-'}",
        f"image_sha256: {rec.image_sha256 or '-'}",
        f"recipe_sha256: {rec.recipe_sha256 or '-'}",
        f"git: {rec.git_commit or '-'}{' (dirty)' if rec.git_dirty else ''}",
        f"versions: hpcexp {rec.hpcexp_version}, apptainer {rec.apptainer_version or '-'}",
        f"command: {shlex.join(rec.command) if rec.command else '-'}",
        f"folder: {paths.dir}",
        f"stdout: {paths.stdout}",
        f"stderr: {paths.stderr}",
        f"results: {paths.results}",
    ]
    return lines


def _reconciled(layout: "Layout", items: Sequence[tuple["RunPaths", "RunRecord"]], *, by_time: bool = True
                ) -> list[tuple["RunPaths", "RunRecord"]]:
    from hpcexp.execute.base import reconcile

    out = reconcile(layout, items)
    if by_time:  # ids order by the second only; two runs started in the same second go by created_at
        out = sorted(out, key=lambda t: (t[1].created_at or "", t[1].run_id))
    return out


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------

@click.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter (repeatable). Passed byte for byte as --KEY=VALUE and/or HPCEXP_PARAM_KEY "
                   "(experiment setting params_as).")
@click.option("-d", "--detach", is_flag=True, help="Start in the background and print the run id.")
@arch_option
@click.option("--gpu/--no-gpu", default=None, help="Pass the host GPUs in (apptainer --nv); default: the "
              "experiment's `gpu` setting.")
@click.option("--writable/--read-only", default=None, help="Bind the experiment folder read-write (default: "
              "read-only unless the experiment sets `writable: true`).")
@click.option("--allow-bind", is_flag=True, help="Allow binds of /, $HOME and its parents, project parents, system "
              "folders and credential folders (~/.ssh, ~/.gnupg, ~/.aws...).")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when the run is stopped.")
@click.option("--rebuild", is_flag=True, help="Rebuild the image even when it is cached.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@click.option("--slurm", "via_slurm", is_flag=True,
              help="Submit to Slurm instead: an alias of `hpcexp submit NAME` (see its --help for resources).")
@pass_ctx
def run_cmd(ctx: "Ctx", name: str, args: tuple[str, ...], params: tuple[str, ...], detach: bool,
            arch: str | None, gpu: bool | None, writable: bool | None, allow_bind: bool, grace: float,
            rebuild: bool, quiet: bool, via_slurm: bool = False) -> None:
    """Run experiment NAME without root; results land in runs/NAME/RUN_ID/.

    \b
    Arguments after `--` replace the experiment's configured args:
      hpcexp run train -p lr=0.1 -- --epochs 3
    Exit code: 0 succeeded, 5 the experiment failed (its code is in the record),
    3 apptainer could not start it, 4 the image build failed, 130 interrupted.
    """
    if via_slurm:  # `hpcexp run --slurm` is an alias of `hpcexp submit` (the documented spelling)
        from hpcexp.cli.slurm_cmds import submit_cmd

        click.get_current_context().invoke(submit_cmd, name=name, args=args, params=params, arch=arch,
                                           allow_bind=allow_bind)
        return
    from hpcexp.build.image import ensure_image
    from hpcexp.core.config import host_arch
    from hpcexp.execute import local
    from hpcexp.runtime import apptainer, launch

    project = ctx.project()
    exp = project.experiment(name)
    launch.check_binds(project, exp, allow_binds=allow_bind)
    parsed = launch.parse_params(params)
    arch = arch or host_arch()
    dropped = apptainer.scrubbed_vars()
    if dropped:
        warn(f"ignoring {', '.join(dropped)} from your shell (binds and environment come from hpcexp.yaml)")

    def progress(kind: str, text: str) -> None:
        if kind == "warn":
            warn(text)
        elif not quiet:
            info(text)

    image = ensure_image(project, exp, arch, force=rebuild, quiet=quiet, progress=progress, pull=True)

    def created(paths: "RunPaths", rec: "RunRecord") -> None:
        if not detach:
            info(f"run {rec.run_id} ({paths.dir})", quiet)

    payload_env = None
    if exp.tracking is not None:
        from hpcexp.app.tracking import local_payload_env

        payload_env = local_payload_env(project, exp, parsed)
    paths, rec = local.start_run(project, exp, image, params=parsed, args=list(args) if args else None,
                                 arch=arch, gpu=gpu, writable=writable, allow_binds=allow_bind, detach=detach,
                                 grace=grace, tee=True, interactive=True, cmdline=["hpcexp", *sys.argv[1:]],
                                 on_created=created, payload_env=payload_env)
    if exp.tracking is not None and not detach:
        from hpcexp.app.tracking import after_local_run

        note = after_local_run(project, paths, rec)
        if note:
            info(note, quiet)
    if detach:
        click.echo(rec.run_id)
        if rec.state == "running":
            info(f"run {rec.run_id} started in the background: hpcexp logs -f {rec.run_id}", quiet)
        elif rec.state == "succeeded":
            info(f"run {rec.run_id} already finished: succeeded", quiet)
    _raise_for(paths, rec, detach)


def _raise_for(paths: "RunPaths", rec: "RunRecord", detach: bool) -> None:
    from hpcexp.errors import EnvironmentProblem, Interrupted, PayloadFailed

    if rec.state in ("succeeded", "running", "created"):
        if not detach and rec.state == "succeeded":
            info(f"run {rec.run_id}: succeeded; results in {paths.results}")
        return
    if rec.launch_error:
        raise EnvironmentProblem(f"run {rec.run_id}: apptainer could not start the container: {rec.launch_error}",
                                 hint=f"full output in {paths.stderr}")
    if rec.state == "cancelled":
        raise Interrupted(f"run {rec.run_id} was stopped ({rec.reason or 'cancelled'}); recorded as cancelled")
    what = f"exit code {rec.exit_code}" if rec.exit_code is not None else (rec.reason or rec.state)
    raise PayloadFailed(f"run {rec.run_id} failed with {what}; see {paths.stderr}", code=rec.exit_code,
                        hint=f"hpcexp logs --stderr {rec.run_id}")


# --------------------------------------------------------------------------------------
# status / runs
# --------------------------------------------------------------------------------------

@click.command("status")
@click.argument("ref", required=False)
@json_option
@pass_ctx
def status_cmd(ctx: "Ctx", ref: str | None, as_json: bool) -> None:
    """State of all runs, or details of one RUN (id, unique prefix, experiment name, @last, sweep id)."""
    from hpcexp.core.layout import Layout
    from hpcexp.core.runs import iter_runs, resolve

    project = ctx.project()
    layout = Layout(project)
    if ref is None:
        items = _reconciled(layout, list(iter_runs(layout)))
    else:
        items = _reconciled(layout, resolve(layout, ref), by_time=False)  # a sweep stays in task order
    tracked = _tracking_configured(project)
    if tracked:  # finished runs not exported yet go to the tracking server in the background
        from hpcexp.app import tracking

        waiting = tracking.kick(project, items)
        if waiting and not as_json:
            info(f"tracking: {waiting} finished run(s) not exported yet; sending them in the background "
                 "(or: hpcexp export mlflow)")
    if as_json:
        rows = json_rows(items)
        if tracked:
            for row, (paths, rec) in zip(rows, items):
                row["tracking"] = tracking.describe(project, paths, rec)
        emit_json(rows)
        return
    if ref is not None and len(items) == 1 and not items[0][1].sweep_id:
        lines = _details(*items[0])
        if tracked:
            described = tracking.describe(project, *items[0])
            if described is not None:
                lines.append(tracking.describe_line(described))
        click.echo("\n".join(lines))
        return
    if ref is not None and items and items[0][1].sweep_id and all(r.sweep_id == items[0][1].sweep_id
                                                                  for _, r in items):
        click.echo(f"sweep {items[0][1].sweep_id}: {summarize([r for _, r in items])}")
    echo_runs(items)
    warn_damaged(items)


def _tracking_configured(project: Any) -> bool:
    """An attribute check: with no `tracking:` in hpcexp.yaml, status imports and sends nothing."""
    return project.tracking is not None or any(e.tracking is not None for e in project.experiments.values())


@click.command("runs")
@click.argument("name", required=False)
@json_option
@pass_ctx
def runs_cmd(ctx: "Ctx", name: str | None, as_json: bool) -> None:
    """Table of runs (of experiment NAME, or all): state, age, duration, exit code, parameters."""
    from hpcexp.core.config import check_name
    from hpcexp.core.layout import Layout
    from hpcexp.core.runs import iter_runs

    project = ctx.project()
    layout = Layout(project)
    if name is not None:
        check_name(name, "experiment name")
        if name not in project.experiments and not layout.experiment_runs(name).is_dir():
            project.experiment(name)  # NotFound with a did-you-mean
    items = _reconciled(layout, list(iter_runs(layout, name)))
    if as_json:
        emit_json(json_rows(items))
        return
    echo_runs(items)
    warn_damaged(items)


# --------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------

@click.command("logs")
@click.argument("ref")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends (follows by name, as tail -F).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=None, help="Only the last N lines.")
@click.option("--stderr", "which", flag_value="stderr", help="Show stderr instead of stdout.")
@click.option("--both", "which", flag_value="both", help="Show stdout and stderr, lines prefixed.")
@click.option("--stdout", "which", flag_value="stdout", default=True, hidden=True)
@pass_ctx
def logs_cmd(ctx: "Ctx", ref: str, follow: bool, lines: int | None, which: str) -> None:
    """Print a run's output: RUN is an id, a unique prefix, an experiment name (its latest run) or @last.

    With -f, keeps printing until the run ends, then exits (a sweep id follows all its tasks).
    """
    import time

    from hpcexp.core.layout import Layout
    from hpcexp.core.runs import read_record, resolve
    from hpcexp.execute import logs
    from hpcexp.execute.base import log_files, poll_interval, reconcile

    layout = Layout(ctx.project())
    items = resolve(layout, ref)
    warn_damaged(items)
    several = len(items) > 1
    files = []
    for paths, rec in items:
        tag = f"{rec.task_index if rec.task_index is not None else rec.run_id}" if several else ""
        for log in log_files(paths, rec):
            if which in (log.stream, "both"):
                label = ("out: " if log.stream == "stdout" else "err: ") if which == "both" else ""
                files.append(((f"[{tag}] " if several else "") + label, log.path))
    out = sys.stdout.buffer
    if not follow:
        logs.show(files, out=out, lines=lines)
        return

    state = {"next": 0.0}

    def until() -> bool:
        now = time.monotonic()
        current = [(p, read_record(p)) for p, _ in items]
        if all(r.terminal for _, r in current):
            return True
        interval = poll_interval(r for _, r in current)
        if now >= state["next"]:
            state["next"] = now + interval
            current = reconcile(layout, current)
            return all(r.terminal for _, r in current)
        return False

    logs.follow(files, until, out=out, lines=lines)


# --------------------------------------------------------------------------------------
# stop
# --------------------------------------------------------------------------------------

@click.command("stop")
@click.argument("refs", nargs=-1, required=True)
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
@json_option
@pass_ctx
def stop_cmd(ctx: "Ctx", refs: tuple[str, ...], grace: float, as_json: bool) -> None:
    """Stop runs: SIGTERM to the whole container process tree, SIGKILL after --grace seconds.

    RUN is an id, a unique prefix, an experiment name (its latest run), @last or a sweep id.
    The record then says `cancelled`.
    """
    from hpcexp.core.layout import Layout
    from hpcexp.core.runs import resolve
    from hpcexp.errors import UsageError
    from hpcexp.execute.base import stop

    layout = Layout(ctx.project())
    items: list[tuple[Any, Any]] = []
    seen = set()
    for ref in refs:
        for paths, rec in resolve(layout, ref):
            if paths.dir not in seen:
                seen.add(paths.dir)
                items.append((paths, rec))
    for _paths, rec in items:
        if rec.error:
            raise UsageError(f"cannot stop run {rec.run_id}: its record is damaged ({rec.error})",
                             hint="nothing was changed; inspect that run folder by hand")
    final = stop(layout, items, grace=grace)
    if as_json:
        emit_json(json_rows(final))
        return
    for (_paths, before), (_, rec) in zip(items, final):
        if before.terminal:
            info(f"run {rec.run_id} had already ended: {rec.state}")
        else:
            info(f"run {rec.run_id}: {rec.state}" + (f" ({rec.reason})" if rec.reason else ""))
